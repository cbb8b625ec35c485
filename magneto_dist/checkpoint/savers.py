"""How the training loop saves: in the loop (`Saver`: manager.save), or in the background
(`AsyncSaver`, checkpoint.async_save), with the same guarantees.

A background save of step N, on every rank at the same step:
1. begin (training thread, collective): refuse it if the disk cannot hold it, unmark the tag,
   then DeepSpeed's save_checkpoint with the snapshot engine installed (async_save.py): every
   file's state is copied into shared host memory, nothing of size is written; the RNG state
   joins the copy. The copy goes to this rank's writer and the loop goes on with step N+1.
2. write (a writer process per rank, fed by a thread of the rank; no collectives): each file
   under a temp name, fsync, rename, digest.
3. finalize (training thread, collective), at the end of the first step at which every rank's
   writer is done: the loop's per-step all-reduce, which already carries the stop flag, carries
   "my writer is busy" beside it, so finding that out costs no extra collective; then the
   manager's own tail (record sizes and digests, complete.json and `latest` by rank 0, prune).
   Collectives run only in the training thread: on the writer thread they would interleave
   with training's own and deadlock or pair up wrongly across ranks.

One save in flight: a save due while the previous one is writing, and the end of the run
(the last step, SIGTERM, a non-finite stop), first wait for it and finalize it. The wait is a
collective poll (all-reduce of "busy" and bytes written, every POLL_S), so every rank waits
together, and each poll that finds bytes written renews the step watchdog: a write that
progresses is not a hang, one that stops is. Until its marker is written a tag is incomplete,
and pruning runs only when a marker is written, so the previous complete tag stays the resume
point while a newer one is written; a kill at any moment resumes from it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..compat.ds_engine import replace_checkpoint_engine
from ..config import Config
from ..dims import ParallelDims
from ..errors import NoSpaceError, RestartNeeded
from ..resilience.faults import NO_FAULTS, Faults
from . import manager
from .async_save import BackgroundWriter, SnapshotCheckpointEngine, WriteBatch
from .integrity import size_text, total_bytes
from .space import full_disk_as_no_space
from .tags import CheckpointDir
from .write_process import WriterProcess

POLL_S = 0.25       # a waiting rank looks at its writer this often (and all ranks agree)
KEEPALIVE_S = 5.0   # the step watchdog is renewed at most this often while a write progresses


class Saver:
    """Saves in the loop: manager.save, whole, when called. `report(row)` gets one metrics
    row per save; `keepalive()` renews the step watchdog during long waits."""

    def __init__(self, engine, ckpt_dir: str, cfg: Config, dims: ParallelDims,
                 faults: Faults = NO_FAULTS, log=print,
                 report: Optional[Callable[[dict], None]] = None,
                 keepalive: Callable[[], None] = lambda: None):
        self.engine, self.cfg, self.dims = engine, cfg, dims
        self.ckpts = CheckpointDir(ckpt_dir)
        self.faults, self.log, self.keepalive = faults, log, keepalive
        self.report = report or (lambda row: None)
        self.rank = dist.get_rank()

    def save(self, step: int, client_state: dict, extra_rng: Optional[dict]) -> None:
        """Collective: the checkpoint of `step`."""
        start = time.monotonic()
        tag = manager.save(self.engine, self.ckpts, step, client_state, self.cfg, self.dims,
                           self.cfg.checkpoint.keep_last, extra_rng=extra_rng,
                           faults=self.faults, log=self.log)
        self.report({"step": step, "tag": tag, "async": False,
                     "blocking_s": round(time.monotonic() - start, 4)})

    def busy(self) -> bool:
        """Whether this rank is still writing a checkpoint."""
        return False

    def pending(self) -> bool:
        """Whether a save was begun and not yet finalized (the same on every rank)."""
        return False

    def finalize(self, at_step: int) -> None:
        """Collective: complete the pending save (every rank's writer is done)."""

    def flush(self, at_step: int, reason: str = "the run ends") -> None:
        """Collective: wait for the pending save, if any, and finalize it at `at_step` (`reason`
        says why, in the log line of a wait)."""


@dataclass
class PendingSave:
    """A background save between begin and finalize."""
    step: int
    tag: str
    client_state: dict      # what the marker records of it (data position, split size)
    batch: WriteBatch       # this rank's files, in the writer
    blocking_s: float       # how long begin stopped the loop
    waited_s: float = 0.0   # how long a later save or the end of the run waited for it


class AsyncSaver(Saver):
    """Saves in the background (see the module docstring)."""

    def __init__(self, *args, device: torch.device = torch.device("cpu"),
                 write: Optional[Callable[..., dict]] = None, **kwargs):
        """`write`: how the writer thread writes a file (default: through a writer process,
        started now so that its imports are done before the first save)."""
        super().__init__(*args, **kwargs)
        self.device = device
        self.snapshots = replace_checkpoint_engine(self.engine, SnapshotCheckpointEngine)
        self.writer = BackgroundWriter(write=write or WriterProcess().write,
                                       on_file=self._on_file)
        self.current: Optional[PendingSave] = None
        self.waits = 0            # saves that came due while the previous one was writing
        self.told_size = False    # the host copy's size is logged at the first save

    def busy(self) -> bool:
        return self.writer.busy()

    def pending(self) -> bool:
        return self.current is not None

    def save(self, step: int, client_state: dict, extra_rng: Optional[dict]) -> None:
        self.flush(step, f"the save of step {step} is due")
        tag, start = self.ckpts.at_step(step), time.monotonic()
        manager.prepare_save(tag)
        batch = WriteBatch(tag.name, root=tag.path, step=step)
        with full_disk_as_no_space(tag), self.snapshots.collecting(batch):
            manager.write_files(self.engine, tag, client_state, self.cfg, extra_rng,
                                save_file=self.snapshots.save)
        self.faults.inject("kill_after_snapshot", self.rank, step)
        self.writer.submit(batch)
        blocking = time.monotonic() - start
        self.current = PendingSave(step, tag.name, client_state, batch, blocking)
        if not self.told_size:
            self.told_size = True
            self.log(f"checkpoint.async_save: this rank's host copy of its checkpoint state is "
                     f"{size_text(batch.snapshot_bytes)} (shared memory, kept for the "
                     "next saves)")
        self.log(f"saving checkpoint {tag.label} in the background: the loop "
                 f"stopped {blocking:.2f} s to copy {size_text(batch.snapshot_bytes)}")

    def _on_file(self, batch: WriteBatch, written: int) -> None:
        """In the writer thread, before the first file and after each durable one."""
        points = {0: ("slow_write",), 1: ("kill_mid_write", "sigterm_mid_write")}
        for point in points.get(written, ()):
            self.faults.inject(point, self.rank, batch.step)

    def flush(self, at_step: int, reason: str = "the run ends") -> None:
        pending = self.current
        if pending is None:
            return
        start = time.monotonic()
        if self._wait_for_writers(f"{reason} while {pending.tag} is still being written"):
            pending.waited_s = time.monotonic() - start
        self.finalize(at_step)

    def _wait_for_writers(self, why: str) -> bool:
        """Collective: until every rank's writer is done; renews the watchdog while the
        writers make progress. -> whether any rank was still writing (the wait is logged and
        counted)."""
        batch, renewed, waited = self.current.batch, time.monotonic(), False
        last_bytes = None  # all ranks' bytes at the first poll
        while True:
            batch.done.wait(POLL_S)
            agreed = torch.tensor([float(self.busy()), float(batch.bytes_written)],
                                  dtype=torch.float64, device=self.device)
            dist.all_reduce(agreed)  # sum: ranks still writing, bytes written by all
            busy, written = agreed.tolist()
            if not busy:
                return waited
            if not waited:
                waited = True
                self.waits += 1
                self.log(f"{why}: waiting for it (one save in flight; {self.waits} wait(s) "
                         "so far)")
            progressed = last_bytes is not None and written != last_bytes
            if last_bytes is None or (progressed and time.monotonic() - renewed >= KEEPALIVE_S):
                if progressed:
                    self.keepalive()
                last_bytes, renewed = written, time.monotonic()

    def finalize(self, at_step: int) -> None:
        pending, self.current = self.current, None
        self.keepalive()
        batch = self._written(pending)
        self.faults.inject("kill_in_save", self.rank, pending.step)
        tag = self.ckpts.tag(pending.tag)
        files, digest_seconds = manager.finish_save(
            tag, pending.client_state, self.dims, self.cfg.checkpoint.keep_last,
            known=batch.records)
        waited = f", a wait of {pending.waited_s:.2f} s for it" if pending.waited_s else ""
        self.log(f"saved checkpoint {tag.label} in the background "
                 f"({size_text(total_bytes(files))}; the loop "
                 f"stopped {pending.blocking_s:.2f} s{waited}; written in {batch.seconds:.2f} s, "
                 f"the other files durable and digested in {digest_seconds:.2f} s)")
        self.report({"step": pending.step, "tag": pending.tag, "async": True,
                     "blocking_s": round(pending.blocking_s, 4),
                     "write_s": round(batch.seconds, 4), "bytes": batch.bytes_written,
                     "snapshot_bytes": batch.snapshot_bytes, "done_step": at_step,
                     "waited_s": round(pending.waited_s, 4), "waits": self.waits})

    def _written(self, pending: PendingSave) -> WriteBatch:
        """This rank's finished batch. When any rank's write failed, every rank raises: the
        failed rank its own error (a full disk as NoSpaceError), the others one that ends the
        run with the same exit code, so that no rank waits in a collective for a dead one."""
        try:
            with full_disk_as_no_space(self.ckpts.tag(pending.tag)):
                self.writer.wait()
            failure = None
        except BaseException as err:  # raised below, after every rank knows
            failure = err
        report = (isinstance(failure, NoSpaceError), str(failure)[:300]) if failure else None
        failed = torch.tensor([float(failure is not None)], device=self.device)
        dist.all_reduce(failed)
        if not failed.item():
            return pending.batch
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, report)
        if failure is not None:
            raise failure
        rank, (no_space, message) = next((r, v) for r, v in enumerate(reports) if v)
        error = NoSpaceError if no_space else RestartNeeded
        raise error(f"rank {rank} could not write {pending.tag} in the background ({message}); "
                    f"{pending.tag} is not marked complete")


def make_saver(engine, ckpt_dir: str, cfg: Config, dims: ParallelDims, **kwargs) -> Saver:
    """The saver checkpoint.async_save asks for."""
    if cfg.checkpoint.async_save:
        return AsyncSaver(engine, ckpt_dir, cfg, dims, device=engine.device, **kwargs)
    return Saver(engine, ckpt_dir, cfg, dims, **kwargs)
