"""Writing small files so that a reader never sees half of one, waiting for a file that another
local rank builds, and one builder at a time when several nodes share a filesystem."""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
import json
from typing import Callable, List, Optional

WAIT_TIMEOUT_S = 1800  # a node's other ranks wait this long for local rank 0's build


def atomic_write(path: str, text: str) -> None:
    """Temp file, fsync, rename: the old file or the whole new one, even after a crash."""
    tmp = f"{path}.tmp{os.getpid()}"
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
    """The JSON objects of a JSON-lines file ([] if it does not exist). A line that does not
    parse (cut short by a killed writer, or damaged) is skipped, after on_bad_line(number,
    text) when given (1-based line number)."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
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
