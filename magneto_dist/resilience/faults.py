"""Deterministic fault injection, for testing that crashes at bad moments lose nothing.

Set MAGNETO_DIST_FAULT=POINT:RANK:STEP (e.g. kill_in_save:1:6) and that rank dies with
SIGKILL's exit status at that point of that step. Points: kill_in_save (after DeepSpeed wrote
this rank's files, before the completeness marker). Unset in normal runs: then a no-op.
"""
from __future__ import annotations

import os

FAULT_ENV = "MAGNETO_DIST_FAULT"


def maybe_inject(point: str, rank: int, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    try:
        name, fault_rank, fault_step = spec.split(":")
        fault_rank, fault_step = int(fault_rank), int(fault_step)
    except ValueError:
        raise ValueError(f"{FAULT_ENV}={spec!r} is not POINT:RANK:STEP") from None
    if name == point and fault_rank == rank and fault_step == step:
        print(f"fault injection: rank {rank} dies at {point}, step {step}", flush=True)
        os._exit(137)
