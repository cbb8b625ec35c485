"""Cells as cluster jobs through submitit: one job per cell on Slurm (`--cluster slurm`), or
through submitit's local executor on this machine (`--cluster local`: the same code path, what
the tests use).

OUT/jobs.jsonl records every submission (cell, job id, attempt) as it is made, so the sweep
process may be killed at any time and rerun. A rerun reuses finished cells (results.jsonl),
collects the rows of jobs that ended while no sweep ran (their RUN_DIR/result.json),
re-attaches to jobs still queued or running (no duplicate submission), and resubmits cells
whose jobs ended without a result, up to --max-attempts; the resubmitted cell resumes from its
newest checkpoint. Stopping the sweep leaves its jobs running; --cancel cancels them.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..errors import ConfigError
from .cell import cell_job, prepare_run_dir, result_row
from .grid import Cell, Sweep
from .pool import gpu_count, open_results, slot_devices, sweep_lock, visible_devices
from .sweep import (RESULTS, append_row, load_results, ordered_results, prepare_data,
                    read_rows)

JOBS = "jobs.jsonl"
SUBMITIT_DIR = "submitit"     # OUT/submitit/: submitit's pickles and the job bodies' logs
POLL_SECONDS = 1.0            # how often the sweep looks for result files (a stat each)
STATE_POLL_S = 60.0           # how often it asks Slurm (one sacct call) which jobs still live
CPUS_PER_GPU = 8              # a cell's default --cpus-per-task: its ranks and data loaders
FLAG_KEYS = {"time": "--time", "partition": "--partition", "account": "--account",
             "nodes": "--nodes-per-cell", "gpus_per_node": "--gpus-per-node",
             "ntasks_per_node": "(one launcher per node)"}


@dataclass
class ClusterOptions:
    cluster: str                        # slurm | local
    jobs: Optional[int] = None          # jobs queued or running at once (None: slurm every
                                        # cell; local what the machine holds)
    nodes_per_cell: int = 1
    gpus_per_node: Optional[int] = None  # None: slurm 1; local 1 if it has GPUs, else 0 (CPU)
    partition: Optional[str] = None
    account: Optional[str] = None
    time_min: int = 240                 # each job's time limit, minutes
    slurm: Dict[str, object] = field(default_factory=dict)  # more sbatch flags, verbatim
    max_attempts: int = 3               # submissions of a cell that may end without a result
    detach: bool = False                # submit, then exit; a rerun collects and submits more

    def gpus(self) -> int:
        if self.gpus_per_node is not None:
            return self.gpus_per_node
        return 1 if self.cluster == "slurm" or gpu_count() else 0


def parse_time(text: str) -> int:
    """Slurm's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> whole minutes."""
    days, _, clock = text.rpartition("-")
    try:
        parts = [int(p) for p in clock.split(":")]
        units = ((3600, 60, 1) if days else {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(parts)])
        seconds = int(days or 0) * 86400 + sum(p * u for p, u in zip(parts, units))
    except (ValueError, KeyError):
        raise ConfigError(f"--time {text!r}: use minutes or [D-]H:MM:SS, e.g. 4:00:00") from None
    if len(parts) > len(units) or min(parts) < 0 or seconds < 60:
        raise ConfigError(f"--time {text!r} must be at least a minute ([D-]H:MM:SS)")
    return -(-seconds // 60)


def slurm_parameters(opts: ClusterOptions, job_name: str) -> dict:
    """submitit SlurmExecutor parameters of one cell's job; --slurm flags win over defaults."""
    params = {"job_name": job_name, "time": opts.time_min, "nodes": opts.nodes_per_cell,
              "ntasks_per_node": 1, "cpus_per_task": CPUS_PER_GPU * max(1, opts.gpus()),
              "signal_delay_s": 120, "stderr_to_stdout": True}
    if opts.gpus():
        params["gpus_per_node"] = opts.gpus()
    for key in ("partition", "account"):
        if getattr(opts, key):
            params[key] = getattr(opts, key)
    extra = {}
    for key, value in opts.slurm.items():
        norm = key.replace("-", "_")
        if norm in FLAG_KEYS:
            raise ConfigError(f"--slurm {key}=...: use {FLAG_KEYS[norm]} instead")
        params.pop(norm, None)
        extra[norm] = value
    if extra:
        params["additional_parameters"] = extra
    return params


class SlurmBackend:
    def __init__(self, opts: ClusterOptions, folder: str):
        import submitit
        try:
            self.executor = submitit.SlurmExecutor(folder)
        except RuntimeError as err:  # no srun on this machine
            raise ConfigError(f"--cluster slurm: {err} (use --cluster local on a machine "
                              "without Slurm)") from None
        self.opts, self.folder, self.submitit = opts, folder, submitit
        self._last_state_check = float("-inf")

    def submit(self, job, name: str) -> str:
        self.executor.update_parameters(**slurm_parameters(self.opts, name))
        return self.executor.submit(job).job_id

    def _job(self, job_id: str):
        return self.submitit.SlurmJob(self.folder, job_id)

    def refresh(self, refs: List[dict], force: bool = False) -> None:
        """One sacct call for the jobs `refs` (and any watched before), at most every
        STATE_POLL_S unless forced."""
        if force or time.monotonic() - self._last_state_check >= STATE_POLL_S:
            for ref in refs:  # a SlurmJob registers its id with submitit's shared watcher
                self._job(ref["job_id"])
            self.submitit.SlurmJob.watcher.update()
            self._last_state_check = time.monotonic()

    def state(self, ref: dict) -> str:
        return self._job(ref["job_id"]).watcher.get_state(ref["job_id"], mode="cache")

    def alive(self, ref: dict) -> bool:
        # submitit's own rule: PENDING, RUNNING, REQUEUED, COMPLETING, PREEMPTED and a job
        # sacct does not know yet (UNKNOWN) are not done
        return not self._job(ref["job_id"]).watcher.is_done(ref["job_id"], mode="cache")

    def cancel(self, ref: dict) -> None:
        self._job(ref["job_id"]).cancel(check=False)

    def log_path(self, ref: dict) -> str:
        return str(self._job(ref["job_id"]).paths.stdout)


class LocalBackend:
    """submitit's LocalExecutor. Its LocalJob knows only the processes this Python process
    started; a rerun of the sweep finds the earlier jobs' controllers by pid (the job id),
    checking their command line so that a reused pid is not taken for one."""

    def __init__(self, opts: ClusterOptions, folder: str):
        import submitit
        if opts.nodes_per_cell != 1:
            raise ConfigError(f"--nodes-per-cell {opts.nodes_per_cell}: --cluster local runs "
                              "on this machine (one node per cell)")
        self.executor = submitit.LocalExecutor(folder)
        # the job gets no GPU from submitit (it would hand out 0..N-1 whatever this process
        # may use): the cell sets CUDA_VISIBLE_DEVICES itself (CellJob.devices)
        self.executor.update_parameters(timeout_min=opts.time_min, gpus_per_node=0,
                                        tasks_per_node=1)
        self.folder = os.path.abspath(folder)
        self.jobs: Dict[str, object] = {}  # job id -> submitit LocalJob, this process's own

    def submit(self, job, name: str) -> str:
        submitted = self.executor.submit(job)
        self.jobs[submitted.job_id] = submitted
        return submitted.job_id

    def refresh(self, refs: List[dict], force: bool = False) -> None:
        for job in self.jobs.values():  # reaps the controllers that ended (no zombies)
            job.done()

    def alive(self, ref: dict) -> bool:
        own = self.jobs.get(ref["job_id"])
        if own is not None:
            return not own.done()
        return _local_controller_alive(ref["job_id"], self.folder)

    def state(self, ref: dict) -> str:
        return "RUNNING" if self.alive(ref) else "ENDED"

    def cancel(self, ref: dict) -> None:
        if self.alive(ref):  # the controller stops its task on SIGINT
            os.kill(int(ref["job_id"]), signal.SIGINT)

    def log_path(self, ref: dict) -> str:
        return os.path.join(self.folder, f"{ref['job_id']}_0_log.out")


def _local_controller_alive(job_id: str, folder: str) -> bool:
    """Whether a local job started by an earlier sweep process still runs."""
    # private API: submitit 1.5.4: a local job's id is the pid of its controller, which runs
    # `python -m submitit.local._local FOLDER` (local/local.py, start_controller)
    try:
        with open(f"/proc/{int(job_id)}/cmdline", "rb") as f:
            cmd = f.read().decode(errors="replace")
    except (OSError, ValueError):
        return False
    return "submitit.local._local" in cmd and folder in cmd


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait until a submission is recorded in jobs.jsonl: a sweep stopped
    between the two would leave a job that no rerun knows about. Deferred by handlers that
    note the signal, not by blocking it: a blocked signal stays blocked in every process
    started meanwhile (submitit's local controller, its job, the trainer: none would stop)."""
    caught = []
    held = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
            for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
        for sig in caught[:1]:
            signal.raise_signal(sig)


class ClusterRunner:
    def __init__(self, sweep: Sweep, opts: ClusterOptions, retry_crashed: bool = False,
                 log=print):
        self.sweep, self.opts, self.retry_crashed, self.log = sweep, opts, retry_crashed, log
        self.results_path = os.path.join(sweep.out_dir, RESULTS)
        self.jobs_path = os.path.join(sweep.out_dir, JOBS)
        folder = os.path.join(sweep.out_dir, SUBMITIT_DIR)
        if opts.cluster == "slurm":
            self.backend = SlurmBackend(opts, folder)
            self.slots = [None] * (opts.jobs or len(sweep.cells()))
        elif opts.cluster == "local":
            self.backend = LocalBackend(opts, folder)
            per_cell = max(1, opts.gpus())
            machine = len(visible_devices()) // per_cell or os.cpu_count() or 1
            self.slots = slot_devices(opts.jobs or machine, per_cell)
        else:
            raise ConfigError(f"--cluster {opts.cluster!r}: slurm or local")
        self._entropy: Optional[float] = None

    # --- the ledger: OUT/jobs.jsonl ---------------------------------------------------------
    def _ledger(self) -> List[dict]:
        return [r for r in read_rows(self.jobs_path, self.log)
                if isinstance(r, dict) and "cell" in r and "job_id" in r and "submission" in r]

    def _plan(self) -> Tuple[List[Cell], Dict[str, tuple], Dict[str, int]]:
        """(cells to submit, cell name -> (cell, ledger row) of live jobs, cell name ->
        submissions since its last recorded row)."""
        rows = load_results(self.results_path, self.log)
        recorded = {r.get("submission") for r in rows} - {None}
        latest = {r["cell"]: r for r in rows}
        ledger = [r for r in self._ledger() if r.get("submission") not in recorded]
        attempts: Dict[str, int] = {}
        newest: Dict[str, dict] = {}
        for ref in ledger:
            attempts[ref["cell"]] = attempts.get(ref["cell"], 0) + 1
            newest[ref["cell"]] = ref
        self.backend.refresh(list(newest.values()), force=True)
        pending, live = [], {}
        for cell in self.sweep.cells():
            row = latest.get(cell.name)
            if row and not (self.retry_crashed and row["verdict"] == "crashed"):
                continue
            ref = newest.get(cell.name)
            if ref and self._collect(cell, ref, attempts.get(cell.name, 0)):
                continue
            if ref and self.backend.alive(ref):
                live[cell.name] = (cell, ref)
            elif ref:
                self._ended_without_result(cell, ref, attempts[cell.name], pending)
            else:
                pending.append(cell)
        return pending, live, attempts

    def _ended_without_result(self, cell: Cell, ref: dict, attempts: int,
                              pending: List[Cell]) -> None:
        """Resubmit a cell whose job ended without a row, or give up after max_attempts."""
        if attempts < self.opts.max_attempts:
            self.log(f"sweep: {cell.name}: job {ref['job_id']} ended without a result (state "
                     f"{self.backend.state(ref)}); resubmitting")
            pending.insert(0, cell)
        else:
            self._give_up(cell, ref, attempts)

    def _collect(self, cell: Cell, ref: dict, attempts: int) -> bool:
        """Record the row of the job `ref` if it has written one; -> whether it had."""
        job = cell_job(self.sweep, cell, None)
        try:
            with open(job.result_path, encoding="utf-8") as f:
                row = json.load(f)
        except (OSError, ValueError):
            return False
        if row.get("submission") != ref.get("submission"):
            return False  # an earlier attempt's
        row.update(attempts=attempts, recorded_at=time.time())
        append_row(self.results_path, row)
        self.log(f"sweep: {cell.name}: {row['verdict']} ({row['reason']}) in "
                 f"{row['seconds']:.0f}s (job {ref['job_id']})")
        return True

    def _submit(self, cell: Cell, attempt: int, devices: Optional[str]) -> dict:
        if self._entropy is None:
            self._entropy = prepare_data(self.sweep, self.log)
        submission = uuid.uuid4().hex
        job = cell_job(self.sweep, cell, self._entropy, self.opts.nodes_per_cell,
                       self.opts.gpus(), devices, submission)
        prepare_run_dir(job)
        with signals_held():
            job_id = self.backend.submit(job, f"{self.sweep.name}:{cell.name}")
            ref = {"cell": cell.name, "job_id": job_id, "submission": submission,
                   "attempt": attempt, "cluster": self.opts.cluster, "devices": devices,
                   "submitted_at": time.time()}
            append_row(self.jobs_path, ref)
        self.log(f"sweep: {cell.name}: submitted as job {job_id}"
                 + (f" (attempt {attempt})" if attempt > 1 else ""))
        return ref

    def _give_up(self, cell: Cell, ref: dict, attempts: int) -> None:
        job = cell_job(self.sweep, cell, self._entropy, submission=ref.get("submission"))
        reason = (f"{attempts} job(s) ended without a result (last: job {ref['job_id']}, state "
                  f"{self.backend.state(ref)}); see {self.backend.log_path(ref)} and "
                  f"{job.log_path}")
        row = result_row(job, None, None, ref["job_id"], 0.0, None, lost=reason)
        row.update(attempts=attempts, recorded_at=time.time())
        append_row(self.results_path, row)
        self.log(f"sweep: {cell.name}: crashed ({reason})")

    def run(self) -> List[dict]:
        with sweep_lock(self.sweep.out_dir):
            open_results(self.sweep, self.log)
            pending, live, attempts = self._plan()
            self.log(f"sweep: {len(self.sweep.cells()) - len(pending) - len(live)} cell(s) "
                     f"finished, {len(live)} job(s) still queued or running (re-attached), "
                     f"{len(pending)} to submit")
            try:
                self._loop(pending, live, attempts)
            except (KeyboardInterrupt, SystemExit):
                self.log(f"sweep: stopped; {len(live)} job(s) keep running: rerun the same "
                         "command to re-attach and collect their rows, or add --cancel")
                raise
        return self.results()

    def _loop(self, pending: List[Cell], live: Dict[str, tuple], attempts: Dict[str, int]):
        while pending or live:
            used = {ref.get("devices") for _, ref in live.values()}
            free = [d for d in self.slots if d is None or d not in used]
            while pending and len(live) < len(self.slots) and free:
                cell = pending.pop(0)
                attempts[cell.name] = attempts.get(cell.name, 0) + 1
                devices = free.pop(0)
                live[cell.name] = (cell, self._submit(cell, attempts[cell.name], devices))
            if self.opts.detach:
                self.log(f"sweep: detached with {len(live)} job(s) queued or running and "
                         f"{len(pending)} cell(s) waiting; rerun to collect and go on")
                return
            time.sleep(POLL_SECONDS)
            self.backend.refresh([ref for _, ref in live.values()])
            for name, (cell, ref) in list(live.items()):
                n = attempts.get(name, 0)
                if self._collect(cell, ref, n):
                    del live[name]
                elif not self.backend.alive(ref) and not self._collect(cell, ref, n):
                    del live[name]  # (the row is looked for once more: written meanwhile?)
                    self._ended_without_result(cell, ref, n, pending)

    def cancel(self) -> int:
        """Cancel the live jobs of cells without a result; -> how many."""
        with sweep_lock(self.sweep.out_dir):
            _, live, _ = self._plan()
            for cell, ref in live.values():
                self.backend.cancel(ref)
                self.log(f"sweep: {cell.name}: cancelled job {ref['job_id']}")
        return len(live)

    def results(self) -> List[dict]:
        return ordered_results(self.results_path, [c.name for c in self.sweep.cells()], self.log)
