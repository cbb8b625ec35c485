"""Index caches that a killed build cannot poison.

megatron-core writes its sample/shuffle/dataset index caches (`<hash>-GPTDataset-train-
shuffle_index.npy`, ...) in place with numpy.save and trusts any file of the right name on the
next run: a process killed while writing one left it short, and every later run died with
"mmap length is greater than file size", naming no file, with nothing rebuilt. Here a build
writes into a fresh temporary directory inside the cache directory; each file is fsynced and
renamed into place, and only then a record (the marker) lists every file with its size. A run
uses the caches only when the record exists and every file has its recorded size; otherwise it
says which file is wrong and builds them again.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from typing import Dict, Optional

from ..files import atomic_write


def cache_problem(marker: str) -> Optional[str]:
    """None when the caches recorded in `marker` are all there at their recorded sizes; else
    what is wrong, naming the file."""
    if not os.path.exists(marker):
        return f"{marker} does not exist"
    try:
        with open(marker, encoding="utf-8") as f:
            files: Dict[str, int] = json.load(f)["files"]
    except (ValueError, KeyError, TypeError):  # damaged, or the plain "ok" of older versions
        return f"{marker} does not list the cache files and their sizes"
    directory = os.path.dirname(marker)
    for name, size in sorted(files.items()):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != size:
            return f"{path} has {os.path.getsize(path):,} bytes where {size:,} were written"
    return None


@contextlib.contextmanager
def build_directory(cache_dir: str):
    """A fresh directory beside the caches (the same filesystem, so a rename moves a file)."""
    os.makedirs(cache_dir, exist_ok=True)
    path = tempfile.mkdtemp(prefix=".build-", dir=cache_dir)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def publish(build_dir: str, marker: str) -> None:
    """Move every file built in build_dir next to the marker (fsync, then rename), then write
    the marker listing them with their sizes."""
    directory, files = os.path.dirname(marker), {}
    for name in sorted(os.listdir(build_dir)):
        path = os.path.join(build_dir, name)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[name] = os.path.getsize(path)
        os.replace(path, os.path.join(directory, name))
    atomic_write(marker, json.dumps({"files": files}, indent=1) + "\n")


def wait_for_caches(marker: str, what: str, timeout_s: float) -> None:
    """Until the caches recorded in `marker` are complete (local rank 0 of this node builds
    them; a stale record of a damaged cache is waited out while it rebuilds)."""
    deadline = time.monotonic() + timeout_s
    while cache_problem(marker) is not None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f}s for {what} ({marker}: "
                               f"{cache_problem(marker)}); did local rank 0 of this node fail? "
                               "see its log")
        time.sleep(0.2)
