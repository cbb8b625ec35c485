"""Deterministic fault injection, for testing that failures at bad moments lose nothing.

Production code never reads the environment for this: the training loop, the checkpoint save
and the universal conversion each take a `Faults` object and call it at their fault points, and
every caller gets NO_FAULTS (whose calls do nothing) unless an entry point built one from the
environment with `faults_from_env()`.

MAGNETO_DIST_FAULT=POINT:RANK:STEPS[,POINT:RANK:STEPS...], where STEPS is one step (6), a range
(6-8) or an open range (6-). With MAGNETO_DIST_FAULT_ONCE_DIR set, each fault fires once per
(point, rank, step) over all the attempts of a supervised run (a marker file there records it),
so a restarted group replaying that step goes on. Points:
- kill_at_step: that rank SIGKILLs itself at the start of that step.
- hang: that rank stops making progress at the start of that step (sleeps forever).
- kill_in_save: that rank dies with SIGKILL's exit status after DeepSpeed wrote its files of
  that step's checkpoint, before the completeness marker (a background save: once every
  rank's writer has finished, before the marker).
- kill_after_snapshot: (checkpoint.async_save) that rank dies so once its snapshot of that
  step's checkpoint is taken, before its background writer starts.
- kill_mid_write: (checkpoint.async_save) that rank's background writer kills the process so
  once the first of its files of that step's checkpoint is durable.
- sigterm_mid_write: (checkpoint.async_save) that rank's background writer sends its process
  SIGTERM (a preemption) once the first of its files of that step's checkpoint is durable.
- slow_write: (checkpoint.async_save) that rank's background writer waits SLOW_WRITE_S before
  it writes that step's checkpoint (a slow filesystem: the next steps change the live state,
  and the next save comes due, while it writes).
- kill_in_convert: that rank dies while it converts the checkpoint of that step to its
  universal form (resuming in another layout), after the conversion, before the rename.
- nonfinite_loss: that rank's loss is NaN in those steps (so are its gradients); runs without
  a pipeline.
- slow_step: that rank sleeps SLOW_STEP_S at the start of each of those steps, before it
  fetches its batch (a straggler: a slow host or input pipeline; the straggler check names it,
  section data, while its peers wait for it in the step's first collective).
- loss_spike: that rank's loss (and so its gradients) is scaled by LOSS_SPIKE_SCALE in the steps
  that train on those global batches: a bad batch. STEPS count global batches of the data, not
  optimizer steps: batch k is the one step k trains on in a run that skipped no data, so a
  replay of the step meets it again and a run that skipped past it (train.spike_skip_steps)
  does not. Runs without a pipeline.
- bitflip: at the start of that step, before anything reads the weights, one bit (the highest
  mantissa bit: a silent change of up to half the value, no inf or NaN) of one element of one
  parameter this rank holds is flipped, as a memory fault would (training/replica_check.py
  flip_bit says which element).
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

FAULT_ENV = "MAGNETO_DIST_FAULT"
ONCE_ENV = "MAGNETO_DIST_FAULT_ONCE_DIR"
POINTS = ("kill_at_step", "hang", "kill_in_save", "kill_in_convert", "nonfinite_loss",
          "kill_after_snapshot", "kill_mid_write", "sigterm_mid_write", "slow_write", "slow_step",
          "loss_spike", "bitflip")
SLOW_WRITE_S = 2.0
SLOW_STEP_S = 0.5  # many times a test step (~30 ms), far under the hang watchdog (>= 60 s)
LOSS_SPIKE_SCALE = 4.0  # a bad batch's loss: 4x, a rise of several nats at any loss above ~1


class Faults:
    """The fault points' interface; this base injects nothing (NO_FAULTS)."""

    def active(self, point: str, rank: int, step: int) -> bool:
        """Whether a fault is set for this point, rank and step (and fires now)."""
        return False

    def inject(self, point: str, rank: int, step: int) -> None:
        """Die, hang, signal or stall here if a fault is set for this point, rank and step."""


NO_FAULTS = Faults()


@dataclass(frozen=True)
class FaultSpec:
    point: str
    rank: int
    first: int
    last: Optional[int]  # None: every step from `first` on

    @classmethod
    def parse(cls, spec: str) -> "FaultSpec":
        try:
            point, rank, steps = spec.split(":")
            first, dash, last = steps.partition("-")
            parsed = cls(point, int(rank), int(first),
                         (int(last) if last else None) if dash else int(first))
        except ValueError:
            raise ValueError(f"{FAULT_ENV}={spec!r} is not POINT:RANK:STEP, POINT:RANK:FIRST-LAST "
                             "or POINT:RANK:FIRST-") from None
        if point not in POINTS:
            raise ValueError(f"{FAULT_ENV}={spec!r}: unknown point {point!r}; points are "
                             f"{', '.join(POINTS)}")
        return parsed

    def covers(self, point: str, rank: int, step: int) -> bool:
        return (point == self.point and rank == self.rank and self.first <= step
                and (self.last is None or step <= self.last))


class InjectedFaults(Faults):
    """Faults as MAGNETO_DIST_FAULT sets them; `once_dir` makes each fire once over restarts."""

    def __init__(self, specs: List[FaultSpec], once_dir: Optional[str] = None):
        self.specs, self.once_dir = specs, once_dir

    def _first_time(self, key: Tuple[str, int, int]) -> bool:
        """False if this fault already fired in an earlier attempt; marks it otherwise."""
        if not self.once_dir:
            return True
        os.makedirs(self.once_dir, exist_ok=True)
        try:
            os.close(os.open(os.path.join(self.once_dir, "-".join(map(str, key))),
                             os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    def active(self, point: str, rank: int, step: int) -> bool:
        if any(spec.covers(point, rank, step) for spec in self.specs):
            return self._first_time((point, rank, step))
        return False

    def inject(self, point: str, rank: int, step: int) -> None:
        if not self.active(point, rank, step):
            return
        print(f"fault injection: rank {rank} at {point}, step {step}", flush=True)
        if point == "hang":
            while True:
                time.sleep(3600)
        if point == "kill_at_step":
            os.kill(os.getpid(), signal.SIGKILL)
        if point == "sigterm_mid_write":
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if point == "slow_write":
            time.sleep(SLOW_WRITE_S)
            return
        if point == "slow_step":
            time.sleep(SLOW_STEP_S)
            return
        os._exit(137)


def faults_from_env() -> Faults:
    """The faults the environment asks for (tests), else NO_FAULTS. Entry points call this once
    and pass the result down."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return NO_FAULTS
    return InjectedFaults([FaultSpec.parse(one) for one in spec.split(",")],
                          os.environ.get(ONCE_ENV))
