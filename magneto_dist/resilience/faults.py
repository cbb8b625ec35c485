"""Deterministic fault injection, for testing that failures at bad moments lose nothing.

Set MAGNETO_DIST_FAULT=POINT:RANK:STEPS[,POINT:RANK:STEPS...], where STEPS is one step (6), a
range (6-8) or an open range (6-). Unset in normal runs: then every call is a no-op. With
MAGNETO_DIST_FAULT_ONCE_DIR set, each fault fires once per (point, rank, step) over all the
attempts of a supervised run (a marker file there records it), so a restarted group replaying
that step goes on. Points:
- kill_at_step: that rank SIGKILLs itself at the start of that step.
- hang: that rank stops making progress at the start of that step (sleeps forever).
- kill_in_save: that rank dies with SIGKILL's exit status after DeepSpeed wrote its files of
  that step's checkpoint, before the completeness marker.
- kill_in_convert: that rank dies while it converts the checkpoint of that step to its
  universal form (resuming in another layout), after the conversion, before the rename.
- nonfinite_loss: that rank's loss is NaN in those steps (so are its gradients); runs without
  a pipeline.
"""
from __future__ import annotations

import os
import signal
import time

FAULT_ENV = "MAGNETO_DIST_FAULT"
ONCE_ENV = "MAGNETO_DIST_FAULT_ONCE_DIR"


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


def _first_time(point: str, rank: int, step: int) -> bool:
    """False if this fault already fired in an earlier attempt (ONCE_ENV); marks it otherwise."""
    once_dir = os.environ.get(ONCE_ENV)
    if not once_dir:
        return True
    os.makedirs(once_dir, exist_ok=True)
    try:
        os.close(os.open(os.path.join(once_dir, f"{point}-{rank}-{step}"),
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def fault_active(point: str, rank: int, step: int) -> bool:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return False
    for one in spec.split(","):
        name, fault_rank, first, last = _parse(one)
        if (name == point and fault_rank == rank and first <= step
                and (last is None or step <= last)):
            return _first_time(point, rank, step)
    return False


def maybe_inject(point: str, rank: int, step: int) -> None:
    """Die or hang here if a fault is set for this point, rank and step."""
    if not fault_active(point, rank, step):
        return
    print(f"fault injection: rank {rank} at {point}, step {step}", flush=True)
    if point == "hang":
        while True:
            time.sleep(3600)
    if point == "kill_at_step":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(137)
