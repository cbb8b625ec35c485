"""Ranks that notice their launcher is gone.

DeepSpeed's runner forwards no signal on a single node: SIGTERM to the `deepspeed` command makes
it exit 143 at once while its per-node launch.py and the ranks train on, unsupervised (measured).
torchrun's workers likewise live on as orphans when their agent is killed (they run in sessions
of their own, so killing the agent's process group misses them). So a rank
launched by one of these watches the launcher processes above it and, when one goes, asks for the
same graceful stop as SIGTERM: finish the step, save, exit 75.

Only known launchers are watched, and a supervisor that names itself: a program that runs
training commands and must not leave them behind when it dies, even by kill -9 (the stability
sweep), puts its pid in SUPERVISOR_ENV of their environment. A rank started from a shell
(`python launch/pretrain_gpt.py` under nohup, say) must not stop because its terminal closed.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Optional, Tuple

POLL_SECONDS = 1.0
# Substrings of a launcher's command line: DeepSpeed's per-node launcher and torchrun's agent.
LAUNCHER_MARKS = ("deepspeed.launcher.launch", "torch.distributed.run", "torchrun")
SUPERVISOR_ENV = "MAGNETO_DIST_SUPERVISOR_PID"  # a supervising program's pid, set by it
Launchers = Tuple[Tuple[int, str], ...]  # (pid, command line) of each, nearest first


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # gone, or no /proc (macOS): nothing to watch
        return ""


def parent_of(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def launcher_chain() -> Launchers:
    """(pid, command line) of the launchers above this process, nearest first: the parent if it
    is a known launcher, and for DeepSpeed's launch.py also the `deepspeed` runner above it;
    then the supervisor named in SUPERVISOR_ENV, if any. The entry point asks first thing,
    while they are all alive, and hands the answer to the training loop, so a launcher killed
    during start-up is still noticed once training begins."""
    chain = []
    parent = os.getppid()
    cmd = _cmdline(parent)
    if any(mark in cmd for mark in LAUNCHER_MARKS):
        chain.append((parent, cmd))
        if "deepspeed.launcher.launch" in cmd:
            runner = parent_of(parent)
            runner_cmd = _cmdline(runner) if runner and runner > 1 else ""
            if "deepspeed" in runner_cmd:
                chain.append((runner, runner_cmd))
    supervisor = os.environ.get(SUPERVISOR_ENV, "")
    if supervisor.isdigit():  # already gone: "" differs from any live command line at once
        chain.append((int(supervisor), _cmdline(int(supervisor)) or "(exited)"))
    return tuple(chain)


def _gone(pid: int, cmd: str) -> bool:
    return _cmdline(pid) != cmd  # exited (or, after a pid reuse, became something else)


def watch_launchers(chain: Launchers,
                    on_gone: Callable[[str], None]) -> Optional[threading.Thread]:
    """Start a daemon thread that calls on_gone(description) once, when a launcher of `chain`
    (launcher_chain) exits. Returns the thread, or None when there is no launcher to watch."""
    if not chain:
        return None

    def poll():
        event = threading.Event()
        while not event.wait(POLL_SECONDS):
            for pid, cmd in chain:
                if _gone(pid, cmd):
                    on_gone(f"launcher pid {pid} exited")
                    return

    thread = threading.Thread(target=poll, name="launcher-watch", daemon=True)
    thread.start()
    return thread
