"""torch 2.13's CUDA caching-allocator history, which logging.memory_snapshot records.

torch.cuda.memory._record_memory_history (start: max_entries alloc/free events kept with their
stacks; stop: enabled=None) and torch.cuda.memory._dump_snapshot (a pickle that
https://pytorch.org/memory_viz draws) are the documented way to see what holds GPU memory
("Understanding CUDA Memory Usage" in torch's docs), but private by name.
"""
from __future__ import annotations

import torch.cuda.memory

from . import require_attribute, require_parameters

LIBRARY = "torch"


def start_recording(max_entries: int) -> None:
    torch.cuda.memory._record_memory_history(max_entries=max_entries)


def stop_recording() -> None:
    torch.cuda.memory._record_memory_history(enabled=None)


def dump_snapshot(path: str) -> None:
    torch.cuda.memory._dump_snapshot(path)


def check() -> None:
    """What this module relies on is still there (run at import)."""
    memory = torch.cuda.memory
    require_attribute(LIBRARY, memory, "_record_memory_history",
                      "torch.cuda.memory._record_memory_history")
    require_attribute(LIBRARY, memory, "_dump_snapshot", "torch.cuda.memory._dump_snapshot")
    require_parameters(LIBRARY, memory._record_memory_history,
                       ["enabled", "context", "stacks", "max_entries"],
                       "torch.cuda.memory._record_memory_history")
    require_parameters(LIBRARY, memory._dump_snapshot, ["filename"],
                       "torch.cuda.memory._dump_snapshot")


check()
