"""The process that writes a background checkpoint's files (checkpoint/async_save.py).

Serializing and writing in a thread of the training process made every step during a write
~4x slower on this CPU (tools/bench_checkpoint.py: the write and the training thread fight for
the GIL, each waiting on the other's every release; a plain microbenchmark of the two kept
training at 0.26-0.41 of its speed alone), so the work happens in a process of its own: the
training process hands over the snapshot's tensors in shared memory (no copy on the way) and
the writer process runs torch.save, the digest, fsync and the renames. A thread of the training
process waits for each file's reply, which costs it no GIL.

The writer process dies with its rank (PR_SET_PDEATHSIG): a killed rank's writer must not
finish a file into a tag that a restarted attempt is writing again. It ignores SIGINT and
SIGTERM, which a terminal or a launcher may send to the whole process group: the rank decides
when to stop, and waits for its writes.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import queue
import signal
import sys
from typing import Any, Callable, Optional

import torch
import torch.multiprocessing as mp
import xxhash

from ..files import fsync_dir
from ..resilience.watchdog import die_with
from .integrity import DIGEST

# Bytes hashed per call (the digest holds the GIL of the process that computes it).
HASH_SLICE = 8 * 2 ** 20
REPLY_POLL_S = 0.2  # how often a waiting rank looks at its writer's progress and health


class DigestingFile:
    """A binary file whose write() also counts and digests what goes through it: torch.save
    writes a file front to back through write() (its zip writer refuses to seek), so the
    digest is the file's."""

    def __init__(self, f, on_bytes: Optional[Callable[[int], None]] = None):
        self.f, self.on_bytes = f, on_bytes
        self.digest, self.size = xxhash.xxh3_64(), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), HASH_SLICE):
            self.digest.update(view[start:start + HASH_SLICE])
        written = self.f.write(view)
        self.size += written
        if self.on_bytes:
            self.on_bytes(written)
        return written

    def flush(self) -> None:
        self.f.flush()


def write_durably(obj: Any, path: str, zipfile: bool = True,
                  on_bytes: Optional[Callable[[int], None]] = None) -> dict:
    """torch.save to a temp name (`zipfile`: torch's zip format, as DeepSpeed's
    checkpoint_serialization says), fsync, rename, fsync the directory. -> the file's record
    entry {"size", "xxh3_64"} (checkpoint/integrity.py)."""
    temp = f"{path}.tmp{os.getpid()}"
    with open(temp, "wb") as f:
        out = DigestingFile(f, on_bytes)
        torch.save(obj, out, _use_new_zipfile_serialization=zipfile)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    fsync_dir(os.path.dirname(path))
    return {"size": out.size, DIGEST: out.digest.hexdigest()}


def _serve(requests, replies, written, parent: int) -> None:
    """The writer process: (path, state, zipfile) in, ("ok", record entry) or ("error",
    exception) out, until None."""
    die_with(parent)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(1)

    def count(n: int) -> None:
        written.value += n
    while True:
        request = requests.get()
        if request is None:
            return
        path, state, zipfile = request
        try:
            replies.put(("ok", write_durably(state, path, zipfile, count)))
        except BaseException as err:  # the rank raises it (a full disk becomes NoSpaceError)
            replies.put(("error", err if _picklable(err) else RuntimeError(repr(err))))
        del state, request  # the shared memory is the rank's again


def _picklable(value) -> bool:
    try:
        pickle.dumps(value)
        return True
    except Exception:  # any failure to pickle: send its text instead
        return False


@contextlib.contextmanager
def _main_script_left_out():
    """While a spawned process starts: multiprocessing's spawn runs the parent's main script
    again in the child (spawn.get_preparation_data reads __main__'s __spec__ and __file__), for
    a rank launch/pretrain_gpt.py with the whole training stack's imports: 15 s of CPU on this
    machine, where the writer needs torch alone (8 s). Without both it starts from the target's
    own module."""
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.update(saved)
        if "__spec__" not in saved:
            del main.__spec__


class WriterProcess:
    """A rank's writer process; write() is BackgroundWriter's `write` (called in its
    thread). Started at construction, in the background: it imports torch before the first
    save comes due."""

    def __init__(self):
        ctx = mp.get_context("spawn")  # no fork of a process with threads and a process group
        self.requests, self.replies = ctx.Queue(), ctx.Queue()
        self.written = ctx.Value("q", 0, lock=False)  # bytes, all files so far
        self.process = ctx.Process(target=_serve, name="checkpoint-writer", daemon=True,
                                   args=(self.requests, self.replies, self.written, os.getpid()))
        with _main_script_left_out():
            self.process.start()
        atexit.register(self.stop)  # before multiprocessing's own exit handler joins it

    def write(self, state: Any, path: str, zipfile: bool, count: Callable[[int], None]) -> dict:
        """Have the process write one file; count(n) as its bytes go out. Raises what the
        process raised writing it, or an error if the process died."""
        self.requests.put((path, state, zipfile))
        del state
        reported = self.written.value
        while True:
            try:
                status, value = self.replies.get(timeout=REPLY_POLL_S)
            except queue.Empty:
                if not self.process.is_alive():
                    raise RuntimeError(f"the checkpoint writer process died (exit code "
                                       f"{self.process.exitcode}) while writing {path}")
                status = None
            now = self.written.value
            count(now - reported)
            reported = now
            if status == "error":
                raise value
            if status == "ok":
                return value

    def stop(self) -> None:
        """At exit: every save was waited for on the normal paths; on the others, a write cut
        short leaves an unmarked tag, which resume skips."""
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
