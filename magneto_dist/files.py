"""Writing small files so that a reader never sees half of one."""
from __future__ import annotations

import os


def atomic_write(path: str, text: str) -> None:
    """Temp file, fsync, rename: the old file or the whole new one, even after a crash."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
