"""Writing small files so that a reader never sees half of one, waiting for a file that another
local rank builds, and one builder at a time when several nodes share a filesystem (for long
builds, one whose waiters watch its progress: ProgressLock)."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from typing import Callable, List, Optional

WAIT_TIMEOUT_S = 1800  # a node's other ranks wait this long for local rank 0's build
# A ProgressLock holder whose progress has not changed for this long is presumed hung (or its
# host dead) and is taken over. A converter's longest silent stretch is ds_to_universal loading
# one rank's optimizer file before writing its slices: torch.load took 1.8-4.5 s per GB on this
# (busy) CPU, so 10 minutes covers a file of 130 GB; 6.7B under ZeRO-1 on 64 ranks has ~1.3 GB
# of optimizer state per rank.
STALL_S = 600


def atomic_write(path: str, text: str) -> None:
    """Temp file, fsync, rename: the old file or the whole new one, even after a crash."""
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"  # unique on a shared filesystem
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: str) -> None:
    """A rename or removal inside `path` is on disk once this returns."""
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str, on_bad_line: Optional[Callable[[int, str], None]] = None
               ) -> List[dict]:
    """The JSON objects of a JSON-lines file ([] if it does not exist). Blank lines are
    skipped; a line that is not a JSON object (cut short by a killed writer, or damaged) is
    skipped after on_bad_line(number, text) when given (1-based line number)."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            elif on_bad_line is not None:
                on_bad_line(number, line)
    return rows


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def wait_for_file(path: str, what: str, timeout_s: float = WAIT_TIMEOUT_S,
                  failure: Optional[str] = None, not_before: float = 0.0) -> None:
    """Until `path` exists (local rank 0 builds `what`, the node's other ranks call this). A
    `failure` file written since `not_before` (a time.time()) means the build failed: raise
    its message at once instead of waiting out the timeout."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if failure and os.path.exists(failure) and os.path.getmtime(failure) >= not_before:
            with open(failure, encoding="utf-8") as f:
                raise RuntimeError(f"local rank 0 failed to build {what}: {f.read().strip()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f}s for {what} ({path}); did local rank 0 "
                               "of this node fail? see its log")
        time.sleep(0.2)


@contextlib.contextmanager
def build_lock(path: str):
    """Exclusive while held: local rank 0 of every node builds shared caches, and on a shared
    filesystem two nodes building the same files at once wrote into each other's temp files
    (two launchers on one machine hung at start-up). The second builder waits here, then finds
    the files built."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ProgressLock:
    """One holder at a time of a long build, across hosts that share a filesystem: PATH holds
    the holder's host, pid, a token and a progress value that the holder's heartbeat thread
    rewrites while its work advances (`progress()` returns anything that changes as it does,
    e.g. the bytes written so far). A waiter's `stale_holder()` says when to take over: the
    holder's process is gone (same host), or its progress has not changed for stall_s on the
    waiter's own clock (no clock is compared across hosts). fcntl locks cannot do that: a hung
    holder keeps them forever, and a dead host's lock outlives it on NFS for its lease.

    Taking over rewrites PATH, then re-reads it after a moment: of two waiters taking over at
    once, the one whose token stands goes on. Exclusion is a matter of wasted work, not of
    correctness: a builder must still publish its result with an atomic rename that the first
    one wins."""

    HEARTBEAT_S = 15.0  # how often the holder writes its progress (well inside any stall_s)
    SETTLE_S = 1.0      # a takeover re-reads the lock after this long

    def __init__(self, path: str, stall_s: Optional[float] = None):
        self.path, self.stall_s = path, STALL_S if stall_s is None else stall_s
        self.token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._beat: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._seen, self._seen_at = None, time.monotonic()  # a waiter's last view, and when

    def _record(self, progress) -> str:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                           "progress": progress, "time": time.time()})

    def holder(self) -> Optional[dict]:
        """The lock's contents; None when there is no lock (or a half-written one)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.loads(f.read())
        except (OSError, ValueError):
            return None

    def acquire(self) -> bool:
        """Take the lock if nobody holds it (never blocks)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(self._record(None))
        return True

    def quiet_s(self) -> float:
        """Seconds since a waiter's view of the lock (holder and progress, or no lock at all)
        last changed, as of its last stale_holder() call."""
        return time.monotonic() - self._seen_at

    def stale_holder(self) -> Optional[str]:
        """Why the current holder should be taken over (dead, or no progress for stall_s), or
        None while it works (or there is none). Call it at every poll: it keeps the view."""
        holder = self.holder()
        view = None if holder is None else (holder.get("token"), holder.get("progress"))
        if view != self._seen:
            self._seen, self._seen_at = view, time.monotonic()
        if holder is None:
            return None
        who = f"{holder.get('host')} pid {holder.get('pid')}"
        if holder.get("host") == socket.gethostname() and not pid_alive(int(holder["pid"])):
            return f"{who} is gone"
        if self.quiet_s() > self.stall_s:
            return f"{who} made no progress for {self.quiet_s():.0f} s"
        return None

    def take_over(self) -> bool:
        """Replace a stale holder; True if this process holds the lock afterwards."""
        atomic_write(self.path, self._record(None))
        time.sleep(self.SETTLE_S)
        return (self.holder() or {}).get("token") == self.token

    def start_heartbeat(self, progress: Callable[[], object]) -> None:
        """While held: write progress() into the lock every HEARTBEAT_S seconds."""
        def beat():
            while not self._stop.wait(self.HEARTBEAT_S):
                if (self.holder() or {}).get("token") != self.token:
                    return  # taken over: this process judged hung; its result may still win
                atomic_write(self.path, self._record(progress()))
        self._stop.clear()
        self._beat = threading.Thread(target=beat, name="progress-lock", daemon=True)
        self._beat.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this process's."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        if (self.holder() or {}).get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
