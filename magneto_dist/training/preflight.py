"""Checks that must pass before a run touches its run directory: writable, not in use by another
run (whether it is already finished is checkpoint/resume.py's). Each failure is one line naming
the path and what to do."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import threading
import time
from typing import Optional, Tuple

from ..errors import ConfigError
from ..files import pid_alive

LOCK_NAME = "run.lock"
# Heartbeat of RUN_DIR/run.lock. The holder touches the file this often (a thread); a lock not
# touched for STALE_AFTER_S is stale on any host. Fifteen missed beats: a holder's thread that
# waits on a slow shared filesystem or the GIL for a while is not mistaken for a dead one, and a
# new rank 0 on another host, after rank 0's node died, waits at most this long for its lock
# (and at least two beats, 4 s, against clocks that disagree).
HEARTBEAT_S = 2.0
STALE_AFTER_S = 30.0


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
    """RUN_DIR/run.lock names the host and pid of the run using the directory; its holder
    (global rank 0) touches it every HEARTBEAT_S seconds from a thread. A second run on the
    directory is refused while the holder lives: a fresh lock whose pid is alive on this host,
    or a lock of another host that is still being touched (watched until it is touched again,
    or until it has not been for STALE_AFTER_S). A stale lock is taken over with a warning: its
    pid is gone (this host), it names this very process (a pid reused after a kill -9), or it
    was not touched for STALE_AFTER_S (any host: the node of a lost rank 0 cannot be asked).

    Ages compare this host's clock with the file's modification time, set by the host (or file
    server) of the holder: hosts' clocks must agree to a few seconds (NTP). A lock of another
    host is in any case watched for two heartbeats before it is called stale."""

    def __init__(self, run_dir: str, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.held = False
        self.record: Optional[dict] = None
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None

    def _read(self) -> Tuple[Optional[dict], Optional[float]]:
        """(holder, modification time) of the lock file; (None, None) when it is gone. Opened
        anew on each call: on NFS, open() revalidates the attributes a bare stat may cache.
        A holder of None with a time: half written by a writer killed mid-way (stale)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                mtime = os.fstat(f.fileno()).st_mtime
                text = f.read()
        except OSError:
            return None, None
        try:
            holder = json.loads(text)
        except ValueError:
            return None, mtime
        return (holder if isinstance(holder, dict) else None), mtime

    def _stale_reason(self, holder: Optional[dict], mtime: float, log) -> Optional[str]:
        """Why the lock can be taken over, or None while its holder lives."""
        age = max(0.0, time.time() - mtime)
        try:
            pid, host = int(holder["pid"]), holder["host"]
        except (TypeError, KeyError, ValueError):
            pid, host = None, None  # half written (its writer killed, or still writing)
        if host == socket.gethostname():
            if pid == os.getpid() or not pid_alive(pid):
                return "no such process"
            return (f"not touched for {age:.0f} s: frozen, or its pid was reused"
                    if age >= self.stale_after_s else None)
        # Another host's process cannot be asked: watch the lock for a heartbeat.
        watch = max(self.stale_after_s - age, 2 * self.heartbeat_s)
        log(f"{self.path} names pid {pid} on {host}, touched {age:.0f} s ago; watching it for "
            f"up to {watch:.0f} s (a live run touches it every {self.heartbeat_s:.0f} s)")
        deadline = time.monotonic() + watch
        while time.monotonic() < deadline:
            time.sleep(min(1.0, self.heartbeat_s / 5))
            if self._read() != (holder, mtime):
                return None  # touched (alive), or rewritten: its holder is alive
        return f"not touched for {max(age, watch):.0f} s: its host is gone or stopped"

    def _refusal(self, holder: dict, mtime: float) -> PreflightError:
        age = max(0.0, time.time() - mtime)
        return PreflightError(
            f"{os.path.dirname(self.path)} is in use by pid {holder.get('pid')} on "
            f"{holder.get('host')} (since {holder.get('since')}; its lock was touched {age:.0f} s "
            f"ago); stop that run or use another logging.run_dir. If no such run is alive, "
            f"delete {self.path} (a lock not touched for {self.stale_after_s:.0f} s is taken "
            "over)")

    def acquire(self, log=print) -> None:
        """Take the lock, or raise PreflightError naming its live holder."""
        for _ in range(3):
            if self._create():
                self._start_heartbeat(log)
                return
            holder, mtime = self._read()
            if mtime is None:
                continue  # removed meanwhile: try again
            reason = self._stale_reason(holder, mtime, log)
            now_holder, now_mtime = self._read()
            if reason is None:
                if now_mtime is None:
                    continue
                raise self._refusal(now_holder or holder or {}, now_mtime)
            if (now_holder, now_mtime) == (holder, mtime):  # not taken over meanwhile
                log(f"WARNING: removing stale lock {self.path} ({holder}: {reason})")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
        raise PreflightError(f"could not take {self.path}: another run took it at the same time")

    def _create(self) -> bool:
        self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.record) + "\n")
        self.held = True
        return True

    def _start_heartbeat(self, log) -> None:
        def beat():
            while not self._stop.wait(self.heartbeat_s):
                holder, mtime = self._read()
                if mtime is None:
                    continue  # unreadable for now (a filesystem hiccup): try at the next beat
                if holder != self.record:
                    log(f"WARNING: {self.path} now names {holder}: another run took this "
                        f"directory over (this run's lock was not touched for "
                        f"{self.stale_after_s:.0f} s); its heartbeat stops")
                    return
                with contextlib.suppress(OSError):  # likewise, next beat
                    os.utime(self.path)

        self._stop.clear()
        self._beat = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
        self._beat.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, unless another run has taken it over."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self._read()[0] == self.record:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

