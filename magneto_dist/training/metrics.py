"""Metrics on rank 0: console line, TensorBoard scalars, and one JSON object per line.

metrics.jsonl rows:
- {"split": "train", "step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device",
  "mfu", "memory_gb", "consumed_samples", "skipped_steps", "time"} every log interval
  (skipped_steps: the interval's steps whose update was not applied);
- {"split": "valid", "step", "loss", "ppl", "time"} every eval interval;
- {"split": "diagnostics", "step", "grad_norm_per_layer", ...} every
  logging.diagnostics_interval steps (see training/diagnostics.py);
- {"split": "startup", "step", "startup_seconds", "compile_seconds", "layout", "time"} once,
  after this process's first step (compile_seconds: null unless train.compile=blocks; layout:
  {"tp", "pp", "dp", "zero_stage"});
- {"split": "straggler", "step", "rank", "host", "section", "ratio", "slowdown", "late_s",
  "step_s", "first_step", "time"} per rank that kept its peers waiting over steps
  first_step..step (training/stragglers.py says how it is judged); TensorBoard has every rank's
  slowdown at each check (straggler/slowdown/rank_R);
- {"split": "eval", "step", "task", METRIC: value, ..., "time"} per lm-evaluation-harness task
  of tools/evaluate.py (TensorBoard: eval/TASK/METRIC);
- {"split": "resume", "step", "tag", "time", "process_start", "load_start"} where a resumed
  run starts, and with "reason" where a rollback went back in the running process: the rows
  after it replay the steps after `step` (take the last occurrence of a step);
- {"split": "spike", "step", "loss", "grad_norm", "median", "rise", "action", ...} per loss
  spike (action: warn, rollback, transient, skip, stop, none: no checkpoint to go back to),
  {"split": "spike", "action": "skip_data", "skipped_samples": [first, end), "before_step"}
  per skipped data window, {"split": "spike", "action": "hardware_fault", "ranks", "hosts",
  "why"}, and {"split": "replica_mismatch", "step", "rank", "host", "last_agreed", "what"} per
  rank a replica check names (training/healing.py);
- {"split": "checkpoint", "step", "tag", "async", "blocking_s", "time", ...} per save, once it
  is complete: the seconds the loop stopped for it; a background save adds "write_s" (its
  write), "bytes" (rank 0's files), "snapshot_bytes" (rank 0's host copy), "done_step" (the
  step at whose end it was found written on every rank), "waited_s" (how long the next save,
  or the end of the run, waited for it) and "waits" (saves so far that had to wait).
"""
from __future__ import annotations

import json
import math
import os
import resource
import time
from typing import List, Optional

import torch

from .metrics_file import METRICS

# Dense (no sparsity) bf16/fp16 tensor-core peak TFLOP/s per device, from the vendors'
# datasheets; fp32 runs on GPUs are compared with the same peak, as MFU is conventionally quoted.
# Rows are (model, variant, peak), first match wins: a device name matches a row when the model
# is one of its words (or run of words) and, for a variant other than None, the variant is one
# of its words too. torch names the parts "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe",
# "NVIDIA H100 NVL", "NVIDIA A100-SXM4-80GB", "Tesla V100-PCIE-16GB", "NVIDIA L40S", ...; a
# substring match gave the PCIe and NVL parts the SXM part's peak and an L40 the L4's.
PEAK_TFLOPS = [
    ("H200", "NVL", 835.0), ("H200", None, 989.0),
    ("H100", "PCIE", 756.0), ("H100", "NVL", 835.0), ("H100", None, 989.0),
    ("A100", None, 312.0), ("A10", None, 125.0),
    ("L40S", None, 362.0), ("L40", None, 181.0), ("L4", None, 121.0),
    ("V100S", None, 130.0), ("V100", "PCIE", 112.0), ("V100", None, 125.0),
    ("RTX 4090", None, 165.2), ("MI300X", None, 1307.4),
]


def peak_tflops_for(device_name: str) -> Optional[float]:
    """The table's peak for a device name, or None when no row matches it."""
    words = device_name.upper().replace("-", " ").replace("_", " ").split()
    padded = f" {' '.join(words)} "
    for model, variant, peak in PEAK_TFLOPS:
        if f" {model} " in padded and (variant is None or variant in words):
            return peak
    return None


def device_peak_tflops(configured: Optional[float], log=print) -> Optional[float]:
    """The configured peak, else the table's entry for this GPU, else None (no MFU)."""
    if configured:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = peak_tflops_for(name)
    if peak is None:
        log(f"no MFU: {name!r} is not in the peak-TFLOP/s table (training/metrics.py); set "
            "logging.peak_tflops to its dense bf16 peak")
    return peak


def memory_gb() -> float:
    """Peak memory of this process: allocated GPU memory, or resident CPU memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def process_start_time() -> float:
    """When this process started (time.time() scale, 10 ms resolution; Linux), imports and
    all: from /proc, since any clock read here comes after seconds of imports."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()



class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool, flops_per_token: float,
                 world_size: int, peak_tflops: Optional[float], layout: Optional[dict] = None):
        """layout: the run's ParallelDims.layout, recorded in the startup row."""
        self.enabled = enabled
        self.layout = layout
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak = peak_tflops
        self.writer = None
        self.jsonl = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            self.jsonl = open(os.path.join(run_dir, METRICS), "a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def _emit(self, row: dict) -> None:
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self.writer.add_scalar(f"{row['split']}/{key}", value, row["step"])
                elif isinstance(value, list):  # per-layer values: one scalar per layer
                    for layer, item in enumerate(value):
                        self.writer.add_scalar(f"{row['split']}/{key}/layer_{layer:03d}", item,
                                               row["step"])

    def train(self, step: int, loss: float, lr: float, grad_norm: Optional[float],
              tokens: int, seconds: float, consumed_samples: int, skipped: int = 0) -> None:
        """`skipped`: steps of this interval whose update was not applied (an fp16 loss-scale
        back-off or a non-finite step); the LR schedule did not advance for them."""
        if not self.enabled:
            return
        tokens_per_s = tokens / max(seconds, 1e-9)
        tflops = self.flops_per_token * tokens_per_s / self.world_size / 1e12
        row = {"split": "train", "step": step, "loss": loss, "lr": lr,
               "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
               "tflops_per_device": tflops,
               "mfu": tflops / self.peak if self.peak else None,
               "memory_gb": memory_gb(), "consumed_samples": consumed_samples,
               "skipped_steps": skipped, "time": time.time()}
        mfu = f" | mfu {row['mfu']:.1%}" if row["mfu"] is not None else ""
        skips = f" | {skipped} skipped" if skipped else ""
        norm = f"{grad_norm:.3f}" if grad_norm is not None else "n/a"
        print(f"step {step:>6} | loss {loss:.4f} | lr {lr:.3e} | grad norm {norm} | "
              f"{tokens_per_s:,.0f} tokens/s | {tflops * 1e3:.1f} GFLOP/s/device{mfu} | "
              f"mem {row['memory_gb']:.2f} GB{skips}", flush=True)
        self._emit(row)

    def started(self, step: int, compile_seconds: Optional[float] = None) -> None:
        """The first step of this process is done: start-up took this long since the command
        (imports, data checks, process group, model, engine, checkpoint load, first step),
        of which `compile_seconds` compiling blocks (train.compile=blocks; None: off)."""
        if not self.enabled:
            return
        seconds = time.time() - process_start_time()
        compiling = f" (compiling {compile_seconds:.1f} s)" if compile_seconds is not None else ""
        print(f"start-up: {seconds:.1f} s from the command to the end of step {step}{compiling}",
              flush=True)
        self._emit({"split": "startup", "step": step, "startup_seconds": seconds,
                    "compile_seconds": compile_seconds, "layout": self.layout,
                    "time": time.time()})

    def valid(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        ppl = math.exp(min(loss, 50.0))
        print(f"step {step:>6} | validation loss {loss:.4f} | perplexity {ppl:.2f}", flush=True)
        self._emit({"split": "valid", "step": step, "loss": loss, "ppl": ppl,
                    "time": time.time()})

    def diagnostics(self, row: dict) -> None:
        """A row of training/diagnostics.py (per-layer lists, model update, max |logit|)."""
        if self.enabled:
            self._emit({"split": "diagnostics", **row, "time": time.time()})

    def evaluation(self, step: int, task: str, metrics: dict) -> None:
        """One lm-evaluation-harness task's scores for the checkpoint of `step`."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"split": "eval", "step": step, "task": task, **metrics,
                                     "time": time.time()}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"eval/{task}/{key}", value, step)

    def straggler(self, row: dict) -> None:
        """A rank that kept its peers waiting (training/stragglers.py): the console line and its
        row. Its fields are not TensorBoard scalars (they would mix ranks in one tag): the
        per-rank slowdowns are (slowdowns())."""
        if not self.enabled:
            return
        there = (f", {row['ratio']:.1f}x its peers' time there" if row["ratio"] is not None
                 else " (its peers spent no time there)")
        print(f"step {row['step']:>6} | straggler: rank {row['rank']} on {row['host']} made "
              f"steps {row['first_step']}-{row['step']} {row['slowdown']:.2f}x as long (its "
              f"peers waited {row['late_s']:.3f} s of {row['step_s']:.3f} s a step, median); "
              f"it fell behind in {row['section']}{there}", flush=True)
        self.jsonl.write(json.dumps({"split": "straggler", **row, "time": time.time()}) + "\n")
        self.jsonl.flush()

    def slowdowns(self, step: int, values: List[float]) -> None:
        """Every rank's slowdown at a straggler check (1.0: not behind its peers)."""
        if self.writer is not None:
            for rank, value in enumerate(values):
                self.writer.add_scalar(f"straggler/slowdown/rank_{rank:05d}", value, step)

    def resumed(self, step: int, tag: str, process_start: float, load_start: float,
                reason: Optional[str] = None) -> None:
        """A restart: rows after this one replay steps from `step` on; readers keep the last
        occurrence of each step. The times of the process start and of the checkpoint load's
        start (time.time()) say where a restart's seconds went (tools/bench_recovery.py).
        `reason`: a rollback inside the running process (training/healing.py), whose
        "process start" is when it began."""
        if self.enabled:
            self._emit({"split": "resume", "step": step, "tag": tag, "time": time.time(),
                        "process_start": process_start, "load_start": load_start,
                        **({"reason": reason} if reason else {})})

    def event(self, row: dict, text: str) -> None:
        """A healing event (training/healing.py: a spike, a skipped window, a replica
        mismatch, a hardware fault): its row, and a marker in TensorBoard's text tab at its
        step (its numbers are scalars there too)."""
        if not self.enabled:
            return
        self._emit({**row, "time": time.time()})
        if self.writer is not None:
            self.writer.add_text(f"events/{row['split']}", text, row["step"])

    def checkpoint(self, row: dict) -> None:
        """A save, once complete (checkpoint/savers.py says what the row holds)."""
        if self.enabled:
            self._emit({"split": "checkpoint", **row, "time": time.time()})

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
