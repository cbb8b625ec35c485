"""Deterministic fault injection, for testing that failures at bad moments lose nothing.

Set MAGNETO_DIST_FAULT=POINT:RANK:STEPS, where STEPS is one step (6), a range (6-8) or an open
range (6-). Unset in normal runs: then every call is a no-op. Points:
- kill_in_save: that rank dies with SIGKILL's exit status after DeepSpeed wrote its files of
  that step's checkpoint, before the completeness marker.
- kill_in_convert: that rank dies while it converts the checkpoint of that step to its
  universal form (resuming in another layout), after the conversion, before the rename.
- nonfinite_loss: that rank's loss is NaN in those steps (so are its gradients); runs without
  a pipeline.
"""
from __future__ import annotations

import os

FAULT_ENV = "MAGNETO_DIST_FAULT"


def _parse(spec: str):
    try:
        name, rank, steps = spec.split(":")
        first, dash, last = steps.partition("-")
        first = int(first)
        last = (int(last) if last else None) if dash else first
        return name, int(rank), first, last
    except ValueError:
        raise ValueError(f"{FAULT_ENV}={spec!r} is not POINT:RANK:STEP, POINT:RANK:FIRST-LAST "
                         "or POINT:RANK:FIRST-") from None


def fault_active(point: str, rank: int, step: int) -> bool:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return False
    name, fault_rank, first, last = _parse(spec)
    return name == point and fault_rank == rank and first <= step and (last is None or step <= last)


def maybe_inject(point: str, rank: int, step: int) -> None:
    """Die here if a kill fault is set for this point, rank and step."""
    if fault_active(point, rank, step):
        print(f"fault injection: rank {rank} dies at {point}, step {step}", flush=True)
        os._exit(137)
