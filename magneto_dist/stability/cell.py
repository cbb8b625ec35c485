"""One cell of a sweep as a job: its trainer run, an early stop once the loss has clearly
diverged, and its result row.

The same object runs a cell everywhere. The local pool (pool.py) starts and polls it beside
other cells; submitit pickles it into a Slurm or local job (cluster.py), where it is the job's
body, run once per node. A cell on one device runs launch/pretrain_gpt.py; a cell on more runs
launch/ft_launch.py on every node of its allocation (one launcher per node), so a crashed or
hung rank restarts the group from the cell's newest checkpoint instead of failing the cell.

A cell whose run directory holds a complete checkpoint resumes from it (a job that died, a
requeue after a timeout or preemption); otherwise its directory is cleared and it starts afresh
(prepare_run_dir, before it starts or is submitted). Node 0 writes RUN_DIR/result.json when the
cell ends; the sweep moves it into results.jsonl. This module is all a job imports (with the
metrics reader and the verdicts): a job's own start-up stays well under a second.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Optional

from ..errors import ExitCode
from ..files import atomic_write
from ..launch_env import ROOT
from ..resilience.parent_watch import SUPERVISOR_ENV
from ..resilience.watchdog import PR_SET_PDEATHSIG
from ..training.metrics_file import current_rows, last_per_step
from ..training.spikes import SpikeRule
from .sweep import grad_norms_of, losses_of, median_step_seconds
from .verdicts import VerdictConfig, early_divergence, judge

if TYPE_CHECKING:  # a job unpickles this module alone: no torch or megatron to import there
    from .grid import Cell, Sweep

RESULT = "result.json"      # RUN_DIR/result.json: the cell's row, written when it ends
POLL_SECONDS = 1.0
STOP_GRACE_S = 60.0         # SIGTERM (save and exit 75), then SIGKILL after this long
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
             "MASTER_PORT")  # a cell is a world of its own, on its own free port


class CellInterrupted(RuntimeError):
    """The trainer stopped on a signal after saving (exit 75): no result. The job ends without
    one, and the sweep resubmits the cell, which resumes from that checkpoint."""


def _cell_process_setup() -> None:
    """In the trainer's (or ft_launch's) process before exec: SIGTERM when the process that
    started it dies (its job killed, a node's job step ended: the trainer saves and exits
    instead of training on as an orphan that holds the run lock; ft_launch forwards it to its
    ranks, which its restarts would otherwise bring back); SIGUSR2 ignored, since Slurm sends submitit's
    timeout signal to every process of the step, and its default action would kill the trainer
    before the job body can ask it to save; and no signal blocked (a mask is inherited: a
    trainer started with SIGTERM blocked would never stop to save)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if sys.platform.startswith("linux"):  # elsewhere: no parent-death signal
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Place:
    """Where one copy of the job body runs: the job's id, this node's index, all its nodes."""
    job_id: Optional[str]
    node: int
    hostnames: List[str]

    @classmethod
    def of_job(cls) -> "Place":
        """Inside a submitit job (Slurm or local): from its environment."""
        import submitit
        env = submitit.JobEnvironment()
        return cls(env.job_id, env.node, list(env.hostnames))

    @classmethod
    def local(cls) -> "Place":
        """A cell of the local pool: no job, one node, this machine."""
        return cls(None, 0, [socket.gethostname()])


def rdzv_port(job_id: str) -> int:
    """The rendezvous port of a multi-node cell: the same on every node, from the job id, so
    two cells sharing a node do not collide."""
    return 20000 + zlib.crc32(job_id.encode()) % 20000


@dataclass
class CellJob:
    name: str                      # the cell's name (grid.Cell.name)
    cell: dict                     # scheme, norm_type, depth, hidden_size, lr, seed, warmup, steps
    shape: dict                    # num_heads, ffn_hidden_size of its width
    overrides: List[str]           # the trainer's key=value overrides
    run_dir: str
    log_path: str                  # the trainer's output, appended attempt after attempt
    verdict: VerdictConfig
    entropy: Optional[float]       # unigram entropy of the corpus (the 'stuck' plateau)
    nodes: int = 1                 # nodes per cell
    gpus_per_node: int = 0         # 0: one process (one CPU thread, or the one GPU of `devices`)
    devices: Optional[str] = None  # CUDA_VISIBLE_DEVICES for the trainer (None: as inherited)
    step_timeout: str = "auto"     # ft_launch's hang watchdog, multi-GPU cells only
    submission: Optional[str] = None  # the sweep's id of this submission (jobs.jsonl): job ids
                                      # alone are not unique (a local job's is a pid)
    spike_rule: SpikeRule = SpikeRule()  # what a spike is: the cell's train.spike_* keys, which
                                         # its run's own detector judges its steps by too
    _running: Optional["CellRun"] = field(default=None, repr=False, compare=False)

    def __getstate__(self):  # the running process stays in the process that started it
        return {k: v for k, v in self.__dict__.items() if k != "_running"}

    def __setstate__(self, state):
        self.__dict__.update(state, _running=None)

    @property
    def ranks_per_node(self) -> int:
        return max(1, self.gpus_per_node)

    @property
    def launched(self) -> bool:
        """Whether the cell runs under launch/ft_launch.py (more than one rank)."""
        return self.nodes * self.ranks_per_node > 1

    @property
    def result_path(self) -> str:
        return os.path.join(self.run_dir, RESULT)

    def command(self, place: Place) -> List[str]:
        """The command one node runs."""
        script = [os.path.join(ROOT, "launch", "pretrain_gpt.py"), *self.overrides]
        if not self.launched:
            return [sys.executable, *script]
        launcher = [sys.executable, os.path.join(ROOT, "launch", "ft_launch.py"),
                    "--nnodes", str(self.nodes), "--nproc-per-node", str(self.ranks_per_node),
                    "--step-timeout", self.step_timeout]
        if self.nodes > 1:
            if not place.job_id or len(place.hostnames) < self.nodes:
                raise RuntimeError(f"cell {self.name} needs {self.nodes} nodes; this job has "
                                   f"{place.hostnames} (job {place.job_id})")
            launcher += ["--rdzv-id", place.job_id, "--rdzv-endpoint",
                         f"{place.hostnames[0]}:{rdzv_port(place.job_id)}"]
        return [*launcher, *script]

    def env(self) -> dict:
        """The trainer's environment; this process (the pool's sweep, or the job) supervises
        it: its ranks save and stop when this process is gone, even by kill -9."""
        env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
        env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                   **{SUPERVISOR_ENV: str(os.getpid())})
        if self.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.devices
        return env

    def start(self, place: Place) -> "CellRun":
        """Start this node's command (the run dir was prepared by prepare_run_dir)."""
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        if place.node == 0 and os.path.isdir(self.run_dir):
            _wait_for_previous_trainer(self.run_dir)
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} cell {self.name}, job "
                      f"{place.job_id}, node {place.node} on {socket.gethostname()}\n")
            log.flush()
            proc = subprocess.Popen(self.command(place), cwd=ROOT, env=self.env(), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_cell_process_setup)
        self._running = CellRun(self, proc, place)
        return self._running

    def __call__(self) -> Optional[dict]:
        """The job body: run the cell to its end; node 0 writes and returns its row."""
        run = self.start(Place.of_job())
        try:
            row = run.wait()
        finally:  # an exception or signal here: the trainer saves and ends, no orphan
            run.stop(grace_s=STOP_GRACE_S)
        if row is None:
            return None
        if row["exit_code"] == ExitCode.INTERRUPTED and not row["stopped_early"]:
            raise CellInterrupted(f"cell {self.name}: the trainer was stopped by a signal and "
                                  "saved (exit 75); resubmit the cell to resume it")
        atomic_write(self.result_path, json.dumps(row))
        return row

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on the job's timeout or preemption signal: the trainer saves
        (SIGTERM: it finishes its step, saves, exits 75) and the job is requeued with this same
        cell, which resumes from that checkpoint."""
        from submitit.helpers import DelayedSubmission
        if self._running is not None:
            self._running.stop(grace_s=STOP_GRACE_S)
        return DelayedSubmission(self)


class CellRun:
    """A started cell: its process, and the row once it has ended."""

    def __init__(self, job: CellJob, proc: subprocess.Popen, place: Place):
        self.job, self.proc, self.place = job, proc, place
        self.started, self.started_at = time.monotonic(), time.time()

    def poll(self) -> tuple:
        """(ended, row): the row once the cell has ended (None on nodes after the first), after
        stopping it first if its loss has clearly diverged."""
        code = self.proc.poll()
        if code is not None:
            return True, self._row(code, None)
        diverged = early_divergence(losses_of(current_rows(self.job.run_dir)), self.job.verdict)
        if not diverged:
            return False, None
        self.stop(grace_s=STOP_GRACE_S if self.job.launched else 0.0)
        return True, self._row(self.proc.returncode, f"stopped early: {diverged}")

    def wait(self) -> Optional[dict]:
        while True:
            ended, row = self.poll()
            if ended:
                return row
            try:
                self.proc.wait(timeout=POLL_SECONDS)
            except subprocess.TimeoutExpired:
                pass

    def terminate(self) -> None:
        """Ask the cell to save and stop (SIGTERM: the trainer finishes its step, saves and
        exits 75; ft_launch forwards it to its ranks, which live in sessions of their own)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self, grace_s: float = 0.0) -> None:
        """End the cell's processes: SIGTERM and up to grace_s for its save, then SIGKILL."""
        if self.proc.poll() is not None:
            return
        if grace_s:
            self.terminate()
            try:
                self.proc.wait(timeout=grace_s)
                return
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def _row(self, code: int, stopped_early: Optional[str]) -> Optional[dict]:
        if self.place.node != 0:
            return None
        return result_row(self.job, code, stopped_early, self.place.job_id,
                          time.monotonic() - self.started, self.started_at)


def result_row(job: CellJob, code: Optional[int], stopped_early: Optional[str],
               job_id: Optional[str], seconds: float, started_at: Optional[float],
               lost: Optional[str] = None) -> dict:
    """A cell's results.jsonl row from its run dir. `lost`: why the cell has no result of its
    own (its jobs died without one); the row is then 'crashed' with that reason."""
    rows = current_rows(job.run_dir)
    losses = losses_of(rows)
    valid = [r["loss"] for r in last_per_step(rows, "valid")]
    verdict = judge(losses, job.entropy, job.verdict, job.spike_rule, grad_norms_of(rows))
    if lost:
        verdict.verdict, verdict.reason = "crashed", lost
    elif stopped_early is None and code not in (ExitCode.OK, ExitCode.NONFINITE):
        verdict.verdict = "crashed"
        verdict.reason = (f"exit code {code}: {_last_line(job.log_path)[:300]}"
                          if code != ExitCode.INTERRUPTED else "stopped by a signal after "
                          "saving (exit 75); --retry-crashed resumes it")
    return {"cell": job.name, **job.cell, **job.shape, "steps_done": len(losses),
            "final_loss": verdict.final_loss, "final_valid_loss": valid[-1] if valid else None,
            "best_valid_loss": min(valid) if valid else None, "verdict": verdict.verdict,
            "reason": stopped_early or verdict.reason,
            "stopped_early": stopped_early is not None or code == ExitCode.NONFINITE,
            "spikes": verdict.spikes, "max_spike": verdict.max_spike,
            "unigram_entropy": job.entropy, "exit_code": code, "seconds": seconds,
            "step_seconds": median_step_seconds(rows), "started_at": started_at,
            "ended_at": time.time(), "job_id": job_id, "submission": job.submission,
            "nodes": job.nodes,
            "gpus_per_node": job.gpus_per_node, "log": job.log_path, "run_dir": job.run_dir,
            **summarize(last_per_step(rows, "diagnostics"))}


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 65536))
            lines = [x.strip() for x in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return "(no log)"
    return next((x for x in reversed(lines) if x), "(empty log)")


def _trains_in(pid: int, run_dir: str) -> bool:
    """Whether process `pid` is a trainer of this run dir (its command line names it; a pid
    reused by an unrelated process does not)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"logging.run_dir={run_dir}".encode() in f.read()
    except OSError:
        return False


def _wait_for_previous_trainer(run_dir: str) -> None:
    """A trainer of an earlier attempt that is still saving on this host (its job was killed,
    it got SIGTERM from _cell_process_setup) holds the run lock: wait for it, then end it."""
    from ..training.preflight import LOCK_NAME  # imports torch: only a resumed cell gets here
    try:
        with open(os.path.join(run_dir, LOCK_NAME), encoding="utf-8") as f:
            holder = json.load(f)
        pid = int(holder["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if holder.get("host") != socket.gethostname():
        return
    deadline = time.monotonic() + STOP_GRACE_S
    while _trains_in(pid, run_dir):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.2)


def prepare_run_dir(job: CellJob) -> None:
    """Before a cell starts or is submitted (in the sweep's process, which has the checkpoint
    code imported): keep a run dir that can be resumed, clear any other, so that a dead
    attempt's metrics never mix with a fresh start's; drop an earlier attempt's result. A path
    that is not a directory is left for the trainer to refuse by name."""
    from ..checkpoint.resume import resume_point
    from ..checkpoint.tags import CheckpointDir
    if os.path.isdir(job.run_dir) and not resume_point(CheckpointDir.of_run(job.run_dir)):
        shutil.rmtree(job.run_dir)
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        os.remove(job.result_path)


def cell_job(sweep: Sweep, cell: Cell, entropy: Optional[float], nodes: int = 1,
             gpus_per_node: int = 0, devices: Optional[str] = None,
             submission: Optional[str] = None) -> CellJob:
    width = sweep.widths[cell.hidden_size]
    return CellJob(cell.name, cell.key(), {"num_heads": width.num_heads,
                                           "ffn_hidden_size": width.ffn_hidden_size},
                   sweep.cell_overrides(cell), sweep.cell_dir(cell),
                   os.path.join(sweep.out_dir, "logs", f"{cell.name}.log"), sweep.verdict,
                   entropy, nodes, gpus_per_node, devices, submission=submission,
                   spike_rule=SpikeRule.of(sweep.cell_config(cell).train))


def summarize(diagnostics: List[dict]) -> dict:
    """The diagnostics' numbers a report needs, from a cell's diagnostics rows."""
    if not diagnostics:
        return {"grad_norm_init": None, "residual_rms_init": None, "residual_rms_final": None,
                "update_ratio_final": None, "max_abs_logit_final": None, "model_update": None}
    first, last = diagnostics[0], diagnostics[-1]
    return {"grad_norm_init": first["grad_norm_per_layer"] if first["step"] == 0 else None,
            "residual_rms_init": first["residual_rms_per_layer"],
            "residual_rms_final": last["residual_rms_per_layer"],
            "update_ratio_final": last["update_ratio_per_layer"],
            "max_abs_logit_final": last["max_abs_logit"],
            "model_update": [[r["step"], r["model_update"]] for r in diagnostics
                             if r["model_update"] is not None]}
