"""Checkpoint files written in the background: a snapshot of step N's state, then a writer thread.

DeepSpeed's engine writes every file of a checkpoint through its `checkpoint_engine.save(
state_dict, path)`. `SnapshotCheckpointEngine` takes that call: it copies the state's tensors
(to CPU, into pinned buffers reused from save to save when the state is on a GPU) and hands the
copy to a `BackgroundWriter` thread, so the training loop goes on with step N+1 while step N's
files are written; the copy is what makes the files exactly step N's, whatever N+1 does to the
live tensors. The writer writes each file under a temp name, fsyncs it, renames it and fsyncs
its directory: a file that exists under its final name is whole and on disk.

What neither engine we could have built on gives (measured with tools/bench_checkpoint.py):
- DeepSpeed 0.19.8's decoupled engine (runtime/checkpoint_engine/decoupled_checkpoint_engine.py)
  hands the live tensors to a writer process and waits for it before the next optimizer step
  (engine.py, `_commit_decoupled_checkpoint` in step()), so the write overlaps one step's forward
  and backward at most; with CPU tensors, moving them to shared memory for the queue is itself
  a copy of the whole state per save.
- torch.distributed.checkpoint's async_save writes its own format (.distcp shards), which
  DeepSpeed's loader, ds_to_universal and this project's converters do not read.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from ..files import fsync_dir


def snapshot(item: Any, pinned: Optional[Dict[Tuple, torch.Tensor]] = None,
             key: Tuple = ()) -> Any:
    """A copy of `item` whose tensors are compact CPU copies (dicts, lists and tuples walked).
    CUDA tensors go into pinned CPU buffers from `pinned`, reused when the same key (file and
    position) comes again with the same shape and dtype."""
    if torch.is_tensor(item):
        item = item.detach()
        if item.device.type == "cpu":
            return item.clone()
        if pinned is None:
            return item.to("cpu")
        buffer = pinned.get(key)
        if buffer is None or buffer.shape != item.shape or buffer.dtype != item.dtype:
            buffer = pinned[key] = torch.empty(item.shape, dtype=item.dtype, pin_memory=True)
        buffer.copy_(item, non_blocking=True)
        return buffer
    if isinstance(item, dict):
        return type(item)((k, snapshot(v, pinned, key + (k,))) for k, v in item.items())
    if isinstance(item, (list, tuple)):
        copied = [snapshot(v, pinned, key + (i,)) for i, v in enumerate(item)]
        return copied if isinstance(item, list) else type(item)(copied)
    return item


def tensor_bytes(item: Any) -> int:
    """Bytes of the tensors inside a (nested) state."""
    if torch.is_tensor(item):
        return item.numel() * item.element_size()
    if isinstance(item, dict):
        return sum(tensor_bytes(v) for v in item.values())
    if isinstance(item, (list, tuple)):
        return sum(tensor_bytes(v) for v in item)
    return 0


def write_durably(obj: Any, path: str) -> int:
    """torch.save to a temp name, fsync, rename, fsync the directory; -> bytes written."""
    temp = f"{path}.tmp{os.getpid()}"
    with open(temp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    os.replace(temp, path)
    fsync_dir(os.path.dirname(path))
    return size


@dataclass
class WriteBatch:
    """The files of one checkpoint on this rank, written in order by the writer thread."""
    label: str                                   # e.g. the tag, for messages
    files: List[Tuple[str, Any]] = field(default_factory=list)  # (path, snapshot)
    done: threading.Event = field(default_factory=threading.Event)
    error: Optional[BaseException] = None
    bytes_written: int = 0
    seconds: float = 0.0


class BackgroundWriter:
    """One daemon thread that writes batches of snapshot files, one batch at a time. A failure
    is kept and raised by the next wait(), in the training thread."""

    def __init__(self, write: Callable[[Any, str], int] = write_durably):
        self.write = write
        self.queue: "queue.Queue[WriteBatch]" = queue.Queue()
        self.current: Optional[WriteBatch] = None
        self.thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            batch = self.queue.get()
            start = time.perf_counter()
            try:
                for path, obj in batch.files:
                    batch.bytes_written += self.write(obj, path)
            except BaseException as err:  # raised again in the training thread by wait()
                batch.error = err
            batch.files = []  # the snapshot's memory goes back as soon as it is on disk
            batch.seconds = time.perf_counter() - start
            batch.done.set()

    def submit(self, batch: WriteBatch) -> None:
        self.current = batch
        self.queue.put(batch)

    def busy(self) -> bool:
        return self.current is not None and not self.current.done.is_set()

    def wait(self) -> Optional[WriteBatch]:
        """Block until the submitted batch is on disk; -> it (None if none was submitted).
        Raises the writer's error, if it had one."""
        batch, self.current = self.current, None
        if batch is None:
            return None
        batch.done.wait()
        if batch.error is not None:
            raise batch.error
        return batch


class SnapshotCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's checkpoint engine, with save() collecting snapshots into the open batch
    instead of writing; the checkpoint manager opens the batch before engine.save_checkpoint and
    submits it after. Loading is DeepSpeed's own (torch.load)."""

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.batch: Optional[WriteBatch] = None
        self.pinned: Dict[Tuple, torch.Tensor] = {}  # reused host buffers (GPU states)

    def preserves_storage_sharing(self) -> bool:
        # False: DeepSpeed hands over the live state dicts without cloning them first; the
        # snapshot below copies every tensor once, compactly
        return False

    def save(self, state_dict, path: str) -> None:
        if self.batch is None:  # not inside a managed save (e.g. DeepSpeed's own tools)
            super().save(state_dict, path)
            return
        use_pinned = torch.cuda.is_available()
        copy = snapshot(state_dict, self.pinned if use_pinned else None,
                        (os.path.basename(path),))
        self.batch.files.append((path, copy))

    def snapshot_ready(self) -> None:
        """The non-blocking device-to-host copies of the open batch are complete."""
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()
