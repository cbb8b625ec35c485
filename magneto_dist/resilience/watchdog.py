"""A rank's side of the fault-tolerant launcher (magneto_dist/launcher): a per-step expiration
timer that lets the agent kill a hung rank, and dying with the agent.

The timer is torch elastic's FileTimerClient, talking to the FileTimerServer the agent runs when
TORCHELASTIC_ENABLE_FILE_TIMER=1 (it passes the pipe's path in TORCHELASTIC_TIMER_FILE). A rank
that does not finish an optimizer step within its allowance is SIGKILLed by the agent, which then
restarts the group. Measured here (torch 2.13): expires() costs ~0.1 ms; call it once per step
(back-to-back calls fill the timer's FIFO).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import statistics
import sys
from typing import List, Optional

STEP_TIMEOUT_ENV = "MAGNETO_DIST_STEP_TIMEOUT"  # seconds, "auto" or "0" (set by the launcher)
SUPERVISED_ENV = "MAGNETO_DIST_SUPERVISED"
LONG_FACTOR = 10         # first steps, evaluation and checkpoint saves get 10x the allowance
FIRST_STEPS = 3          # start-up, compilation and warm caches make the first steps slow
AUTO_FACTOR, AUTO_MIN_S = 5.0, 60.0  # auto: 5x the median step time, at least 60 s
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Under the launcher: SIGKILL this rank when its agent dies (a killed agent otherwise
    leaves its workers running as orphans: they run in sessions of their own)."""
    if os.environ.get(SUPERVISED_ENV) != "1" or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the agent died before the call
        os._exit(137)


class StepWatchdog:
    """`with watchdog.expires(long=...)` around each step; a no-op unless the launcher enabled
    it. The allowance is --step-timeout seconds, or with "auto" AUTO_FACTOR x the median of the
    steps measured so far (LONG allowance until FIRST_STEPS were measured)."""

    def __init__(self, setting: str, timer_file: Optional[str]):
        self.enabled = bool(timer_file) and setting not in ("", "0")
        self.auto = setting == "auto"
        self.fixed = 0.0 if self.auto else float(setting or 0)
        self.durations: List[float] = []
        if self.enabled:
            from torch.distributed.elastic import timer

            self.timer = timer
            timer.configure(timer.FileTimerClient(timer_file))

    @classmethod
    def from_env(cls) -> "StepWatchdog":
        return cls(os.environ.get(STEP_TIMEOUT_ENV, "0"),
                   os.environ.get("TORCHELASTIC_TIMER_FILE"))

    def allowance(self, long: bool) -> float:
        if self.auto:
            if len(self.durations) < FIRST_STEPS:
                return AUTO_MIN_S * LONG_FACTOR
            base = max(AUTO_MIN_S, AUTO_FACTOR * statistics.median(self.durations[-50:]))
        else:
            base = self.fixed
        return base * (LONG_FACTOR if long or len(self.durations) < FIRST_STEPS else 1)

    @contextlib.contextmanager
    def expires(self, long: bool = False):
        if not self.enabled:
            yield
            return
        import time

        start = time.monotonic()
        with self.timer.expires(after=self.allowance(long)):
            yield
        if not long:
            self.durations.append(time.monotonic() - start)
