"""Run a sweep's cells as real runs of launch/pretrain_gpt.py: concurrently, resumably, with
verdicts, early stops and a record of crashes.

Each cell is its own process (its own run_dir under OUT/cells/, its log under OUT/logs/), one
thread on a CPU or one GPU each. OUT/results.jsonl gets one row per finished cell, written when
the cell ends; a rerun of the sweep skips the cells it lists and starts the others afresh.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from ..data.checks import token_ids
from ..files import atomic_write
from ..launch_env import ROOT
from ..resilience.parent_watch import SUPERVISOR_ENV
from .grid import Cell, Sweep
from .verdicts import early_divergence, judge, unigram_entropy

RESULTS = "results.jsonl"
POLL_SECONDS = 1.0


def read_rows(path: str) -> List[dict]:
    """JSON lines; a last line cut short (its writer was killed mid-write) is left out."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise ValueError(f"{path}:{number}: not a JSON line") from None
    return rows


def train_losses(run_dir: str) -> List[float]:
    """Per-step training losses, the last occurrence of each step (metrics.jsonl rows)."""
    by_step = {r["step"]: r["loss"] for r in read_rows(os.path.join(run_dir, "metrics.jsonl"))
               if r["split"] == "train"}
    return [by_step[s] for s in sorted(by_step)]


def prepare_data(sweep: Sweep, log=print) -> float:
    """Build the corpus and index caches once per distinct seed before any cell starts (cells
    starting together would build the same caches at once); -> the corpus's unigram entropy."""
    from ..data.setup import load_tokenizer, prepare_data as prepare_run_data
    from ..launch_env import RankInfo
    ranks = RankInfo()
    for seed in sorted({cell.seed for cell in sweep.cells()}):
        cfg = sweep.cell_config(next(c for c in sweep.cells() if c.seed == seed))
        tokenizer, prefixes = load_tokenizer(cfg, ranks)
        prepare_run_data(cfg, "gpt", tokenizer, prefixes, ranks)
    entropy = unigram_entropy(sum(np.bincount(token_ids(prefix), minlength=tokenizer.vocab_size)
                                  for prefix in prefixes))
    log(f"sweep: data ready; unigram entropy of the corpus {entropy:.3f} nats")
    return entropy


def drop_partial_line(path: str) -> None:
    """Cut a last line left unfinished by a killed writer, so the next row starts a line."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


@dataclass
class Running:
    cell: Cell
    proc: subprocess.Popen
    log_path: str
    started: float
    slot: int                          # which CPU core / GPU of the `jobs` it holds


def _cell_env(slot: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")}  # each cell is a world of one on its own free port
    # the cells stop (saving) when the sweep is gone, even when it is killed with -9
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **{SUPERVISOR_ENV: str(os.getpid())})
    if _gpus():
        env["CUDA_VISIBLE_DEVICES"] = str(slot)
    return env


def _gpus() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_jobs() -> int:
    """One cell per GPU on a GPU node, else one per CPU core (one thread each)."""
    return _gpus() or os.cpu_count() or 1


class SweepRunner:
    def __init__(self, sweep: Sweep, jobs: int, retry_crashed: bool = False, log=print):
        self.sweep, self.jobs, self.log = sweep, jobs, log
        self.results_path = os.path.join(sweep.out_dir, RESULTS)
        self.retry_crashed = retry_crashed
        self.entropy: Optional[float] = None

    def finished(self) -> Dict[str, dict]:
        """Cells with a result row (crashed ones not counted with retry_crashed)."""
        return {r["cell"]: r for r in self.results()
                if not (self.retry_crashed and r["verdict"] == "crashed")}

    def _start(self, cell: Cell, slot: int) -> Running:
        run_dir = self.sweep.cell_dir(cell)
        if os.path.isdir(run_dir):  # an interrupted attempt: its metrics would mix with ours
            shutil.rmtree(run_dir)
        log_path = os.path.join(self.sweep.out_dir, "logs", f"{cell.name}.log")
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "launch", "pretrain_gpt.py"),
                 *self.sweep.cell_overrides(cell)], cwd=ROOT, env=_cell_env(slot), stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        return Running(cell, proc, log_path, time.monotonic(), slot)

    def _record(self, run: Running, code: int, stopped_early: Optional[str]) -> dict:
        cell, run_dir = run.cell, self.sweep.cell_dir(run.cell)
        losses = train_losses(run_dir)
        rows = read_rows(os.path.join(run_dir, "metrics.jsonl"))
        valid = [r["loss"] for r in rows if r["split"] == "valid"]
        diagnostics = [r for r in rows if r["split"] == "diagnostics"]
        verdict = judge(losses, self.entropy, self.sweep.verdict)
        if stopped_early is None and code not in (0, 4):  # 4: the trainer's non-finite stop
            with open(run.log_path, encoding="utf-8", errors="replace") as f:
                last = [line.strip() for line in f if line.strip()][-1:] or ["(empty log)"]
            verdict.verdict, verdict.reason = "crashed", f"exit code {code}: {last[0][:300]}"
        row = {"cell": cell.name, **cell.key(), "steps_done": len(losses),
               "final_loss": verdict.final_loss, "final_valid_loss": valid[-1] if valid else None,
               "best_valid_loss": min(valid) if valid else None, "verdict": verdict.verdict,
               "reason": stopped_early or verdict.reason, "stopped_early": stopped_early is not None
               or code == 4, "spikes": verdict.spikes, "max_spike": verdict.max_spike,
               "unigram_entropy": self.entropy, "exit_code": code,
               "seconds": time.monotonic() - run.started, "log": run.log_path,
               "run_dir": run_dir, **summarize(diagnostics)}
        with open(self.results_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.log(f"sweep: {cell.name}: {row['verdict']} ({row['reason']}) in "
                 f"{row['seconds']:.0f}s")
        return row

    def _poll(self, run: Running) -> Optional[dict]:
        """The cell's result row once it has ended (or was stopped for divergence), else None."""
        code = run.proc.poll()
        if code is not None:
            return self._record(run, code, None)
        diverged = early_divergence(train_losses(self.sweep.cell_dir(run.cell)),
                                    self.sweep.verdict)
        if diverged:
            os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait()
            return self._record(run, run.proc.returncode, f"stopped early: {diverged}")
        return None

    def run(self) -> List[dict]:
        """Every cell not yet in results.jsonl; returns all rows. Ctrl-C stops the running
        cells; a rerun continues with the rest."""
        os.makedirs(os.path.join(self.sweep.out_dir, "logs"), exist_ok=True)
        drop_partial_line(self.results_path)
        atomic_write(os.path.join(self.sweep.out_dir, "sweep.json"),
                     json.dumps({"grid": self.sweep.grid.__dict__,
                                 "run_overrides": self.sweep.run_overrides}, indent=1))
        done = self.finished()
        pending = [c for c in self.sweep.cells() if c.name not in done]
        if done:
            self.log(f"sweep: {len(done)} cells already finished (results.jsonl); "
                     f"{len(pending)} to run")
        self.entropy = prepare_data(self.sweep, self.log)
        running: List[Running] = []
        free_slots = list(range(self.jobs))
        try:
            while pending or running:
                while pending and free_slots:
                    running.append(self._start(pending.pop(0), free_slots.pop(0)))
                time.sleep(POLL_SECONDS)
                for run in list(running):
                    if self._poll(run) is not None:
                        running.remove(run)
                        free_slots.append(run.slot)
        finally:
            for run in running:  # interrupted: no cell outlives the sweep
                os.killpg(run.proc.pid, signal.SIGKILL)
                run.proc.wait()
        return self.results()

    def results(self) -> List[dict]:
        """One row per cell of the grid that has one (the newest), in grid order."""
        rows = {r["cell"]: r for r in read_rows(self.results_path)}
        return [rows[c.name] for c in self.sweep.cells() if c.name in rows]


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
