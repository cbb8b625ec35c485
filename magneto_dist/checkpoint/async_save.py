"""Checkpoint files written in the background: a snapshot of step N's state, then a writer.

DeepSpeed's engine writes every file of a checkpoint through its `checkpoint_engine.save(
state_dict, path)`. `SnapshotCheckpointEngine` takes that call: it copies the state's tensors
into shared-memory buffers (reused from save to save; from a GPU too) and the `BackgroundWriter`
thread hands each file's copy to the rank's writer process (write_process.py), so the training
loop goes on with step N+1 while step N's files are written; the copy is what makes the files
exactly step N's, whatever N+1 does to the live tensors. The writer writes each file under a
temp name, fsyncs it, renames it and fsyncs its directory: a file that exists under its final
name is whole and on disk. It digests the bytes as they go out (XXH3-64, checkpoint/
integrity.py), so the completeness marker's record needs no second read of the files.

What neither engine we could have built on gives (read in the installed sources, measured with
tools/bench_checkpoint.py):
- DeepSpeed 0.19.8's decoupled engine (runtime/checkpoint_engine/decoupled_checkpoint_engine.py)
  queues the live state dicts to a writer process and waits for it before the next optimizer
  step (engine.py step(): `_commit_decoupled_checkpoint` before `_take_model_step`), so the
  write overlaps one step's forward and backward at most; queuing CPU tensors moves their
  storage into shared memory, a copy of the whole state inside save_checkpoint (measured: it
  stopped the loop as long as a synchronous save, and the next step took twice as long).
  Under ZeRO-1/2 it dies on the first save: the ZeRO optimizer's state dict holds tensors
  that require grad, which torch.multiprocessing refuses to queue. And save_checkpoint returns
  before the files exist, so a marker written after it could cover missing files.
- torch.distributed.checkpoint's async_save writes its own format (.distcp shards and a
  .metadata file, of DTensor / ShardedTensor state dicts), which DeepSpeed's loader,
  ds_to_universal and this project's converters do not read.
"""
from __future__ import annotations

import contextlib
import copy
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from ..errors import NoSpaceError
from .write_process import write_durably

SHARED_MEMORY = "/dev/shm"  # where torch's shared-memory tensors live (Linux)
# Leaves of a state that are immutable, so a snapshot may share them with the live state.
IMMUTABLE = (int, float, complex, bool, str, bytes, type(None), torch.dtype, torch.device)


def snapshot(item: Any, staging: Optional[Dict[Tuple, torch.Tensor]] = None,
             key: Tuple = ()) -> Any:
    """A copy of `item` whose tensors are compact CPU copies (dicts, lists and tuples walked;
    other mutable leaves, e.g. DeepSpeed's loss scaler object, deep-copied). With `staging`,
    the copies go into its shared-memory buffers, reused when the same key (file and position)
    comes again with the same shape and dtype: a writer process reads them without a copy."""
    if torch.is_tensor(item):
        return _copy_tensor(item.detach(), staging, key)
    if isinstance(item, dict):
        copied = copy.copy(item)  # keeps the mapping's type (OrderedDict, defaultdict)
        for k, v in item.items():
            copied[k] = snapshot(v, staging, key + (k,))
        return copied
    if isinstance(item, (list, tuple)):
        copied = [snapshot(v, staging, key + (i,)) for i, v in enumerate(item)]
        if isinstance(item, list):
            return copied
        return type(item)(*copied) if hasattr(item, "_fields") else type(item)(copied)
    if isinstance(item, IMMUTABLE):
        return item
    return copy.deepcopy(item)


def _copy_tensor(tensor: torch.Tensor, staging: Optional[Dict[Tuple, torch.Tensor]],
                 key: Tuple) -> torch.Tensor:
    if staging is None:  # compact: torch.save of a view writes its whole storage
        return tensor.clone() if tensor.device.type == "cpu" else tensor.to("cpu")
    buffer = staging.get(key)
    if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
        buffer = staging[key] = _shared_empty(tensor)
    buffer.copy_(tensor)  # from a GPU: into pageable memory, synchronous
    return buffer


def _shared_empty(like: torch.Tensor) -> torch.Tensor:
    try:
        return torch.empty(like.shape, dtype=like.dtype).share_memory_()
    except RuntimeError as err:  # torch's shared memory is /dev/shm, small in many containers
        free = shutil.disk_usage(SHARED_MEMORY).free if os.path.isdir(SHARED_MEMORY) else 0
        raise NoSpaceError(
            f"checkpoint.async_save: no shared memory left for the copy of the checkpoint "
            f"({str(err)[:200]}; {free / 1e9:.1f} GB free in {SHARED_MEMORY}). The copy takes "
            "about this rank's share of the checkpoint (tools/plan_memory.py: host copy): "
            f"enlarge {SHARED_MEMORY} (docker --shm-size) or set checkpoint.async_save=false"
        ) from err


def tensor_bytes(item: Any) -> int:
    """Bytes of the tensors inside a (nested) state."""
    if torch.is_tensor(item):
        return item.numel() * item.element_size()
    if isinstance(item, dict):
        return sum(tensor_bytes(v) for v in item.values())
    if isinstance(item, (list, tuple)):
        return sum(tensor_bytes(v) for v in item)
    return 0


@dataclass
class WriteBatch:
    """The files of one checkpoint on this rank, written in order by the writer thread."""
    label: str                                   # e.g. the tag, for messages
    files: List[Tuple[str, Any]] = field(default_factory=list)  # (path, snapshot)
    root: str = ""                               # the tag directory: records are relative to it
    step: int = 0                                # the step saved (fault points)
    zipfile: bool = True                         # torch.save's format
    records: Dict[str, dict] = field(default_factory=dict)  # name -> {"size", "xxh3_64"}
    bytes_written: int = 0                       # so far: the write's progress
    snapshot_bytes: int = 0                      # the host copy's size
    done: threading.Event = field(default_factory=threading.Event)
    error: Optional[BaseException] = None
    seconds: float = 0.0                         # the write's wall time

    def count(self, n: int) -> None:
        self.bytes_written += n


class BackgroundWriter:
    """One daemon thread that writes batches of snapshot files, one batch at a time, through
    `write` (in-thread write_durably, or WriterProcess.write, which waits for the writer
    process). A failure is kept and raised by the next wait(), in the training thread.
    `on_file(batch, n)` runs in the writer thread before the first file (n = 0) and after the
    n-th is durable (fault points)."""

    def __init__(self, write: Callable[..., dict] = write_durably,
                 on_file: Callable[[WriteBatch, int], None] = lambda batch, n: None):
        self.write, self.on_file = write, on_file
        self.queue: "queue.Queue[WriteBatch]" = queue.Queue()
        self.current: Optional[WriteBatch] = None
        self.thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            batch = self.queue.get()
            start = time.perf_counter()
            try:
                self.on_file(batch, 0)
                for n, (path, obj) in enumerate(batch.files, 1):
                    name = os.path.relpath(path, batch.root or os.path.dirname(path))
                    batch.records[name] = self.write(obj, path, batch.zipfile, batch.count)
                    self.on_file(batch, n)
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
    """DeepSpeed's checkpoint engine, with save() collecting snapshots into a batch inside
    `collecting(batch)` instead of writing; outside it (DeepSpeed's own tools) it writes as
    DeepSpeed's does. Loading is DeepSpeed's own (torch.load)."""

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.batch: Optional[WriteBatch] = None
        # the snapshot's shared-memory buffers, kept from save to save: allocating them
        # (the first save) costs several times the copy into them
        self.staging: Dict[Tuple, torch.Tensor] = {}

    def preserves_storage_sharing(self) -> bool:
        # False: DeepSpeed hands over the live state dicts without cloning them first; the
        # snapshot below copies every tensor once, compactly
        return False

    def save(self, state_dict, path: str) -> None:
        if self.batch is None:
            super().save(state_dict, path)
            return
        copied = snapshot(state_dict, self.staging, (os.path.basename(path),))
        self.batch.files.append((path, copied))
        self.batch.snapshot_bytes += tensor_bytes(copied)

    @contextlib.contextmanager
    def collecting(self, batch: WriteBatch):
        """save() adds to `batch` while inside."""
        batch.zipfile = self.zipfile_serialization
        self.batch = batch
        try:
            yield batch
        finally:
            self.batch = None
