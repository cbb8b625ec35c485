"""A rank's side of the fault-tolerant launcher (magneto_dist/launcher): a per-step expiration
timer that lets the agent kill a hung rank, and dying with the agent.

The timer is torch elastic's FileTimerClient, talking to the FileTimerServer the agent runs when
TORCHELASTIC_ENABLE_FILE_TIMER=1 (it passes the pipe's path in TORCHELASTIC_TIMER_FILE). A rank
that does not finish an optimizer step within its allowance is SIGKILLed by the agent, which then
restarts the group. Measured here (torch 2.13): a timed step costs ~0.1 ms; time each step once
(back-to-back requests fill the timer's FIFO). When the agent stops the group (SIGTERM to the
launcher), it stops its timer server first and then asks the ranks to stop: the step and the
save on the way out run unwatched (a request to the stopped server raised BrokenPipeError, and
the rank died instead of saving).
"""
from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import os
import signal
import statistics
import sys
import time
from typing import List, Optional

STEP_TIMEOUT_ENV = "MAGNETO_DIST_STEP_TIMEOUT"  # seconds, "auto" or "0" (set by the launcher)
SUPERVISED_ENV = "MAGNETO_DIST_SUPERVISED"
# Where a watched rank writes its Python stacks when the agent sends DUMP_SIGNAL (a directory of
# the launcher, set by it): before a hung group is killed, every rank's stacks say which one
# hung and which were only waiting for it in a collective.
STACKS_ENV = "MAGNETO_DIST_STACKS_DIR"
DUMP_SIGNAL = signal.SIGUSR2
# Frames of a rank that waits for its peers (a collective or a point-to-point transfer).
COLLECTIVE_FRAMES = ("torch/distributed/distributed_c10d.py", "deepspeed/comm/")
LONG_FACTOR = 10         # first steps, evaluation and checkpoint saves get 10x the allowance
FIRST_STEPS = 3          # start-up, compilation and warm caches make the first steps slow
AUTO_FACTOR, AUTO_MIN_S = 5.0, 60.0  # auto: 5x the median step time, at least 60 s
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Under the launcher: SIGKILL this rank when its agent dies (a killed agent otherwise
    leaves its workers running as orphans: they run in sessions of their own)."""
    if os.environ.get(SUPERVISED_ENV) == "1":
        die_with(os.getppid())


def die_with(parent: int) -> None:
    """SIGKILL this process when its parent (pid `parent`) dies (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the call
        os._exit(137)


def stacks_path(directory: str, pid: int) -> str:
    return os.path.join(directory, f"{pid}.stacks")


def main_thread_frames(dump: str) -> List[str]:
    """The main thread's frames ("File ..., line N in name", innermost first) in a
    faulthandler dump of all threads: the thread whose outermost frame is the script."""
    for block in dump.split("\n\n"):
        frames = [line.strip() for line in block.splitlines() if line.strip().startswith("File ")]
        if frames and frames[-1].endswith(" in <module>"):
            return frames
    return []


def waiting_for_peers(frames: List[str]) -> bool:
    return any(mark in frame for frame in frames for mark in COLLECTIVE_FRAMES)


class StepWatchdog:
    """`with watchdog.expires(long=...)` around each step; a no-op unless the launcher enabled
    it. The allowance is --step-timeout seconds, or with "auto" AUTO_FACTOR x the median of the
    steps measured so far (LONG allowance until FIRST_STEPS were measured)."""

    SCOPE = "optimizer step"  # the timer's name in the agent's log

    def __init__(self, setting: str, timer_file: Optional[str],
                 stacks_dir: Optional[str] = None):
        self.enabled = bool(timer_file) and setting not in ("", "0")
        self.auto = setting == "auto"
        self.fixed = 0.0 if self.auto else float(setting or 0)
        self.durations: List[float] = []
        self.watching = False  # inside expires(), with the timer armed
        if self.enabled:
            from torch.distributed.elastic import timer

            self.client = timer.FileTimerClient(timer_file)
            if stacks_dir:  # the file stays open: faulthandler writes to its descriptor
                self.stacks = open(stacks_path(stacks_dir, os.getpid()), "w", encoding="utf-8")
                faulthandler.register(DUMP_SIGNAL, file=self.stacks, all_threads=True)

    @classmethod
    def from_env(cls) -> "StepWatchdog":
        return cls(os.environ.get(STEP_TIMEOUT_ENV, "0"),
                   os.environ.get("TORCHELASTIC_TIMER_FILE"), os.environ.get(STACKS_ENV))

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
        start = time.monotonic()
        watched = self._request(self.client.acquire, self.SCOPE, time.time() + self.allowance(long))
        self.watching = watched
        try:
            yield
        finally:
            self.watching = False
            if watched:
                self._request(self.client.release, self.SCOPE)
        if not long:
            self.durations.append(time.monotonic() - start)

    def renew(self) -> None:
        """Inside expires(): a new long allowance from now. For work that is slow but shows
        progress (waiting for a background checkpoint write that keeps writing); its caller
        renews at most every few seconds (each renewal is a request to the timer's FIFO)."""
        if self.enabled and self.watching:
            self._request(self.client.acquire, self.SCOPE, time.time() + self.allowance(True))

    def _request(self, call, *args) -> bool:
        """Whether the timer server took the request; when it is gone (the agent is stopping
        the group), the watchdog turns itself off."""
        try:
            call(*args)
        except BrokenPipeError:
            self.enabled = False
            return False
        return True
