"""Checks that must pass before a run touches its run directory: writable, not in use by another
run, not already finished. Each failure is one line naming the path and what to do."""
from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from typing import Optional

from ..config import TrainConfig
from ..errors import ConfigError
from ..files import pid_alive

LOCK_NAME = "run.lock"


class PreflightError(ConfigError):
    """The run cannot start in this run_dir; the message says why and what to do."""


def check_run_dir_writable(run_dir: str) -> None:
    try:
        os.makedirs(run_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-probe"):
            pass
    except OSError as err:
        raise PreflightError(f"logging.run_dir={run_dir} cannot be written ({err.strerror or err}"
                             f"); choose a writable directory") from None


class RunLock:
    """RUN_DIR/run.lock holds the host and pid of the run using the directory. A second run on
    the same directory is refused; a lock whose process is gone (same host), or that names this
    very process (a pid reused after a kill -9), is stale and taken over with a warning. Held by
    global rank 0 only."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.held = False

    def _holder(self) -> Optional[dict]:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None  # vanished, or half written by a writer killed mid-way: stale

    def acquire(self, log=print) -> None:
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                pid = int((holder or {}).get("pid", -1))
                if holder and (holder.get("host") != socket.gethostname()
                               or (pid != os.getpid() and pid_alive(pid))):
                    raise PreflightError(
                        f"{os.path.dirname(self.path)} is in use by pid {holder.get('pid')} on "
                        f"{holder.get('host')} (since {holder.get('since')}); stop that run or use "
                        f"another logging.run_dir. If no such run is alive, delete {self.path}")
                log(f"WARNING: removing stale lock {self.path} ({holder}: no such process)")
                os.remove(self.path)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(record + "\n")
            self.held = True
            return
        raise PreflightError(f"could not take {self.path}: another run took it at the same time")

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def finished_message(run_dir: str, tag: str, step: int, train: TrainConfig) -> Optional[str]:
    """Why there is nothing to do (the resume tag already reached the end), or None."""
    if step < train.last_step:
        return None
    reached = (f"train.exit_at_step={train.exit_at_step}" if train.exit_at_step
               else f"train.train_iters={train.train_iters}")
    return (f"run {run_dir} is finished: {tag} is at step {step}, {reached}; nothing to do. "
            "Raise train.train_iters to train further, or use a new logging.run_dir")
