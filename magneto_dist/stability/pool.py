"""The local pool: a sweep's cells on this machine, `jobs` at a time, one CPU thread or one GPU
each; results.jsonl gets a row as each cell ends, and a rerun runs only the cells it lacks.

GPUs are this process's own: slot i gets the i-th device of the parent's CUDA_VISIBLE_DEVICES
(a job given GPUs 4-7 runs its cells on 4-7), and more slots than devices is refused, since a
cell without a GPU would silently train on the CPU.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from typing import Iterator, List, Optional, Tuple

from ..errors import ConfigError
from ..files import atomic_write
from .cell import POLL_SECONDS, STOP_GRACE_S, Place, cell_job, prepare_run_dir
from .grid import Cell, Sweep
from .sweep import (RESULTS, append_row, drop_partial_line, load_results, ordered_results,
                    prepare_data, quarantine_bad_lines, results_by_cell, write_sweep_record)

LOCK = "sweep.lock"


def gpu_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def visible_devices() -> List[str]:
    """The GPUs this process may use, named as CUDA_VISIBLE_DEVICES names them (indices, UUIDs
    or MIG ids), in CUDA's order; [] without a GPU."""
    count = gpu_count()
    if not count:
        return []
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return [str(i) for i in range(count)]
    return [d.strip() for d in mask.split(",") if d.strip()][:count]


def slot_devices(jobs: int, per_cell: int = 1) -> List[Optional[str]]:
    """CUDA_VISIBLE_DEVICES of each of `jobs` slots (None for all on a machine without GPUs:
    a CPU thread each)."""
    devices = visible_devices()
    if not devices:
        return [None] * jobs
    slots = len(devices) // per_cell
    if jobs > slots:
        mask = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(
            f"--jobs {jobs} at {per_cell} GPU(s) per cell needs {jobs * per_cell} GPUs; this "
            f"process sees {len(devices)} (CUDA_VISIBLE_DEVICES="
            f"{mask if mask is not None else 'unset'}), and a cell without one would train on "
            f"the CPU; use --jobs {slots} or fewer")
    return [",".join(devices[i * per_cell:(i + 1) * per_cell]) for i in range(jobs)]


def default_jobs() -> int:
    """One cell per GPU on a GPU node, else one per CPU core (one thread each)."""
    return gpu_count() or os.cpu_count() or 1


@contextlib.contextmanager
def sweep_lock(out_dir: str) -> Iterator[None]:
    """One sweep process per output directory: two would run (or submit) the same cells twice.
    flock: released by the kernel when the holder dies, even by kill -9."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK)
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigError(f"{out_dir} is in use by another sweep ({holder}); wait for it to "
                              "end, or use another --out") from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def with_widths(sweep: Sweep, rows: List[dict]) -> Tuple[List[dict], int]:
    """Rows written before the width axis (no hidden_size; names without -dN) given the sweep's
    one width and today's names, so their cells are not run again; -> (rows, how many)."""
    legacy = [r for r in rows if "hidden_size" not in r]
    if not legacy or len(sweep.widths) != 1:
        return rows, 0
    (width,) = sweep.widths.values()
    for row in legacy:
        row.update(hidden_size=width.hidden_size, num_heads=width.num_heads,
                   ffn_hidden_size=width.ffn_hidden_size)
        row["cell"] = Cell(**{k: row[k] for k in Cell.__dataclass_fields__ if k in row}).name
    return rows, len(legacy)


def open_results(sweep: Sweep, log=print) -> str:
    """Make OUT ready for new rows (a line cut short by a kill cut; lines that are not rows
    moved aside; rows from before the width axis upgraded) and record the grid; -> the results
    path."""
    os.makedirs(os.path.join(sweep.out_dir, "logs"), exist_ok=True)
    path = os.path.join(sweep.out_dir, RESULTS)
    quarantine_bad_lines(path, log)
    drop_partial_line(path)
    rows, upgraded = with_widths(sweep, load_results(path, log))
    if upgraded:  # under the sweep's lock: no row is appended meanwhile
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
        log(f"sweep: {upgraded} row(s) of {path} from before the width axis given width "
            f"{rows[0]['hidden_size']} and today's cell names")
    write_sweep_record(sweep.out_dir, sweep)
    return path


class SweepRunner:
    def __init__(self, sweep: Sweep, jobs: int, retry_crashed: bool = False, log=print):
        self.sweep, self.jobs, self.log = sweep, jobs, log
        self.results_path = os.path.join(sweep.out_dir, RESULTS)
        self.retry_crashed = retry_crashed
        self.slots = slot_devices(jobs)  # refused here, before anything runs

    def run(self) -> List[dict]:
        """Every cell not yet in results.jsonl; returns all rows. On Ctrl-C or SIGTERM the
        running cells save and stop; a rerun resumes them and runs the rest."""
        with sweep_lock(self.sweep.out_dir):
            open_results(self.sweep, self.log)
            names = [c.name for c in self.sweep.cells()]
            done = results_by_cell(self.results_path, names, self.log, self.retry_crashed)
            pending = [c for c in self.sweep.cells() if c.name not in done]
            if done:
                self.log(f"sweep: {len(done)} cells already finished (results.jsonl); "
                         f"{len(pending)} to run")
            if pending:
                self._run(pending, prepare_data(self.sweep, self.log))
        return self.results()

    def _run(self, pending: List[Cell], entropy: float) -> None:
        running: List[tuple] = []  # (CellRun, slot index)
        free = list(range(self.jobs))
        try:
            while pending or running:
                while pending and free:
                    slot = free.pop(0)
                    job = cell_job(self.sweep, pending.pop(0), entropy,
                                   devices=self.slots[slot])
                    prepare_run_dir(job)
                    running.append((job.start(Place.local()), slot))
                for run, slot in list(running):
                    ended, row = run.poll()
                    if ended:
                        self._record(row)
                        running.remove((run, slot))
                        free.append(slot)
                time.sleep(POLL_SECONDS)
        finally:  # interrupted: every cell saves and stops (a rerun resumes it); none outlives
            for run, _ in running:  # the sweep
                run.terminate()
            for run, _ in running:
                run.stop(grace_s=STOP_GRACE_S)

    def _record(self, row: dict) -> None:
        row["recorded_at"] = time.time()
        append_row(self.results_path, row)
        self.log(f"sweep: {row['cell']}: {row['verdict']} ({row['reason']}) in "
                 f"{row['seconds']:.0f}s")

    def results(self) -> List[dict]:
        return ordered_results(self.results_path, [c.name for c in self.sweep.cells()], self.log)
