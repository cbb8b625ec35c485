"""What a sweep costs before it queues: each cell's layout, its memory per GPU (the memory
planner of training/memory_plan.py, busiest rank) and step time, and the device-hours of the
whole grid.

A step time is measured where OUT/results.jsonl already holds a cell of the same model shape
and layout (its median time between logged steps), else estimated from the model's FLOPs at
an assumed utilization of a device's peak; the output says which. Evaluation is counted (a
forward pass is a third of a training step's FLOPs); start-up and checkpoint saves are not.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from ..config import Config, with_vocab_size
from ..model import flops_per_token
from ..dims import ParallelDims
from ..training.memory_plan import GiB, Layout, MemoryPlanner
from ..training.metrics import peak_tflops_for
from .grid import Sweep
from .sweep import RESULTS, load_results


@dataclass
class Assumptions:
    device_tflops: float = peak_tflops_for("H100 SXM")  # peak per device (dense bf16)
    mfu: float = 0.35                           # model FLOPs utilization of that peak


def vocabulary(cfg: Config) -> int:
    """The vocabulary a cell's run would have: its tokenizer's, else the built-in corpus's."""
    if cfg.data.prefixes:
        from ..data.tokenizer import TokenizerSpec
        from ..data.tokenizer_types import build_tokenizer
        return build_tokenizer(TokenizerSpec.from_data_config(cfg.data)).vocab_size
    return cfg.data.builtin_vocab_size


def _shape(row_or_cell: dict) -> tuple:
    return tuple(row_or_cell.get(k) for k in ("scheme", "norm_type", "depth", "hidden_size",
                                              "nodes", "gpus_per_node"))


def measured_step_seconds(out_dir: str) -> Dict[tuple, float]:
    """Model shape and layout -> the median step time measured by earlier cells of it."""
    times: Dict[tuple, List[float]] = {}
    for row in load_results(os.path.join(out_dir, RESULTS), log=lambda *a: None):
        if row.get("step_seconds"):
            times.setdefault(_shape(row), []).append(row["step_seconds"])
    return {shape: sorted(values)[len(values) // 2] for shape, values in times.items()}


def cell_cost(cfg: Config, world: int, planner: MemoryPlanner, assume: Assumptions,
              measured: Optional[float]) -> dict:
    t, p, m = cfg.train, cfg.parallel, cfg.model
    dims = ParallelDims.of(cfg, world)
    memory = planner.plan(Layout.of(cfg, dims))["total"]
    tokens = t.global_batch_size * m.max_seq_len
    train_flops = flops_per_token(m, m.max_seq_len) * tokens
    train_flops *= 4 / 3 if p.activation_checkpointing else 1  # recompute: one more forward
    evals = (t.train_iters // t.eval_interval + 1) * t.eval_iters if t.eval_interval else 0
    eval_flops = evals * flops_per_token(m, m.max_seq_len) * tokens / 3
    rate = world * assume.device_tflops * 1e12 * assume.mfu
    step = measured if measured else train_flops / rate
    seconds = t.train_iters * step + (eval_flops / rate)
    return {"layout": dims.describe(), "memory_gib": memory / GiB, "step_seconds": step,
            "measured": bool(measured), "device_hours": seconds * world / 3600}


def sweep_costs(sweep: Sweep, world: int, nodes: int, gpus_per_node: int,
                assume: Assumptions) -> List[dict]:
    """One cost row per cell, in grid order."""
    measured = measured_step_seconds(sweep.out_dir)
    planners: Dict[tuple, MemoryPlanner] = {}
    vocab = None
    rows = []
    for cell in sweep.cells():
        cfg = sweep.cell_config(cell)
        vocab = vocab or vocabulary(cfg)
        cfg = with_vocab_size(cfg, vocab)
        key = (cell.scheme, cell.norm_type, cell.depth, cell.hidden_size)
        if key not in planners:  # a meta-device skeleton per model shape
            planners[key] = MemoryPlanner(cfg.model, cfg.train.precision, cfg.model.max_seq_len)
        shape = _shape({**cell.key(), "nodes": nodes, "gpus_per_node": gpus_per_node})
        rows.append({"cell": cell.name, **cell_cost(cfg, world, planners[key], assume,
                                                    measured.get(shape))})
    return rows


def print_costs(sweep: Sweep, nodes: int, gpus_per_node: int, jobs: Optional[int],
                assume: Assumptions, out=print) -> List[dict]:
    world = nodes * max(1, gpus_per_node)
    rows = sweep_costs(sweep, world, nodes, gpus_per_node, assume)
    width = max(len(r["cell"]) for r in rows)
    out(f"{'cell':<{width}}  {'layout':<28}{'GiB/GPU':>9}{'step s':>9}  {'':<9}{'dev-h':>8}")
    for r in rows:
        out(f"{r['cell']:<{width}}  {r['layout']:<28}{r['memory_gib']:>9.2f}"
            f"{r['step_seconds']:>9.3f}  {'measured' if r['measured'] else 'estimated':<9}"
            f"{r['device_hours']:>8.2f}")
    total = sum(r["device_hours"] for r in rows)
    measured = sum(r["measured"] for r in rows)
    largest = max(rows, key=lambda r: r["memory_gib"])
    concurrent = jobs or len(rows)
    wall = sum(r["device_hours"] / world for r in rows) / min(concurrent, len(rows))
    out(f"\n{len(rows)} cells x {nodes} node(s) x {max(1, gpus_per_node)} device(s): "
        f"{total:,.1f} device-hours in all ({total / max(1, len(rows)):,.2f} per cell); "
        f"about {wall:,.1f} h of wall time at {min(concurrent, len(rows))} cells at once")
    out(f"step times: {measured} measured (OUT/results.jsonl of the same shape), "
        f"{len(rows) - measured} estimated at {assume.mfu:.0%} of {assume.device_tflops:g} "
        "TFLOP/s per device (--device-tflops, --mfu); start-up and saves not counted")
    out(f"largest memory per GPU: {largest['memory_gib']:.2f} GiB ({largest['cell']}; the "
        "planner counts model states and activations of the busiest rank, not the allocator's "
        "fragmentation)")
    return rows
