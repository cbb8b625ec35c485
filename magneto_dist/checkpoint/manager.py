"""Save and load through DeepSpeed, made safe against crashes mid-save, damaged files and a
full disk.

DeepSpeed writes per-rank files and then `latest`, from rank 0, possibly before other ranks have
finished theirs. Here `save_latest=False` is passed, every rank also writes its RNG state, and a
save is a sequence of small steps (`save`): refuse it if the previous tag's size does not fit
(space.py), unmark the tag, write the files, make them durable and record each one's size and
content digest (each rank reads back its share), then rank 0 writes `complete.json` with that
record and the layout, moves `latest` atomically and prunes. A save into a tag that already has
a marker (a rerun from an older tag) removes the marker first, so a crash mid-save never leaves
a tag that looks complete. Which tags count as complete and which are damaged is tags.py's;
which one a run resumes from, resume.py's. The data position is the global consumed-sample
count in the client state.
"""
from __future__ import annotations

import json
import os
import random
import time
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from ..config import Config, dump_config
from ..dims import ParallelDims
from ..files import atomic_write
from ..resilience.faults import NO_FAULTS, Faults
from . import integrity
from .space import check_space, full_disk_as_no_space
from .tags import COMPLETE, CheckpointDir, CheckpointError, Tag, not_a_saved_file


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_path(tag: Tag, rank: int) -> str:
    return os.path.join(tag.path, f"rng_rank{rank:05d}.pt")


def _save_now(obj, path: str) -> None:
    """torch.save under a temp name, then the rename (a synchronous save's small files)."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def write_files(engine, tag: Tag, client_state: dict, cfg: Config, extra_rng: Optional[dict],
                save_file: Callable[[object, str], None] = _save_now) -> None:
    """Collective: DeepSpeed's files of the tag, this rank's RNG state (through `save_file`:
    a background save hands it to its writer) and (rank 0) the resolved config."""
    engine.save_checkpoint(tag.ckpts.path, tag=tag.name, client_state=client_state,
                           save_latest=False)
    rng = rng_state()
    rng.update(extra_rng or {})
    save_file(rng, _rng_path(tag, dist.get_rank()))
    if dist.get_rank() == 0:
        dump_config(cfg, os.path.join(tag.path, "config.yaml"))


def write_marker(tag: Tag, client_state: dict, dims: ParallelDims, files: Dict[str, dict],
                 shared: bool = True) -> None:
    """complete.json: the tag is whole, with what resuming it needs to know. `shared`: every
    rank saw every file (False on node-local disks, where each node holds its ranks' files)."""
    marker = {"step": tag.step, "world_size": dist.get_world_size(), "time": time.time(),
              "consumed_samples": client_state.get("consumed_samples"),
              "train_samples": client_state.get("train_samples"),
              "layout": dims.layout, "shared": shared, "digest": integrity.DIGEST,
              "files": files}
    atomic_write(os.path.join(tag.path, COMPLETE), json.dumps(marker) + "\n")


def write_latest(tag: Tag) -> None:
    """`latest`, which DeepSpeed's own tools (zero_to_fp32.py) read, moved atomically."""
    atomic_write(os.path.join(tag.ckpts.path, "latest"), tag.name)


def prepare_save(tag: Tag) -> None:
    """Collective, before a save writes anything: refuse it if the disk cannot hold it; make
    the tag incomplete (rank 0)."""
    check_space(tag)
    if dist.get_rank() == 0:
        tag.unmark()
    dist.barrier()


def finish_save(tag: Tag, client_state: dict, dims: ParallelDims, keep_last: int,
                known: Optional[Dict[str, dict]] = None) -> Tuple[Dict[str, dict], float]:
    """Collective, once every rank's files of the tag are written: make them durable and
    record their sizes and digests (`known`: this rank's, done already), then rank 0 writes
    the marker, moves `latest` and prunes. -> (the record, this rank's digest seconds)."""
    files, shared, digest_seconds = integrity.record_collectively(
        tag.path, skip=not_a_saved_file, known=known)
    if dist.get_rank() == 0:
        with full_disk_as_no_space(tag):
            write_marker(tag, client_state, dims, files, shared)
            write_latest(tag)
        tag.ckpts.prune(keep_last)
    dist.barrier()
    return files, digest_seconds


def save(engine, ckpts: CheckpointDir, step: int, client_state: dict, cfg: Config,
         dims: ParallelDims, keep_last: int, extra_rng: Optional[dict] = None,
         faults: Faults = NO_FAULTS, log=None) -> str:
    """Collective: every rank calls it. Returns the tag's name. The marker records dims'
    layout. A disk too full for it raises NoSpaceError (before writing when the previous tag's
    size says so, else when a write fails)."""
    tag = ckpts.at_step(step)
    start = time.monotonic()
    prepare_save(tag)
    with full_disk_as_no_space(tag):
        write_files(engine, tag, client_state, cfg, extra_rng)
    faults.inject("kill_in_save", dist.get_rank(), step)
    dist.barrier()  # every rank's files are written
    files, digest_seconds = finish_save(tag, client_state, dims, keep_last)
    if log:
        log(f"saved checkpoint {tag.label} in {time.monotonic() - start:.2f} s "
            f"({integrity.size_text(integrity.total_bytes(files))}; durable and digested in "
            f"{digest_seconds:.2f} s)")
    return tag.name


def load(engine, tag: Tag, load_optimizer: bool = True) -> dict:
    """Collective: load engine state; restore this rank's RNG if it saved one. -> client state."""
    try:
        path, client_state = engine.load_checkpoint(
            tag.ckpts.path, tag=tag.name, load_optimizer_states=load_optimizer,
            load_lr_scheduler_states=load_optimizer)
    except (EOFError, RuntimeError, OSError, KeyError) as err:
        raise CheckpointError(f"could not load {tag.label} ({type(err).__name__}: "
                              f"{str(err)[:300]}); move that directory aside and rerun to resume "
                              "from the previous checkpoint") from err
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {tag.label}")
    rng_file = _rng_path(tag, dist.get_rank())
    if os.path.isfile(rng_file):  # absent when the layout changed: keep the seeded state
        state = torch.load(rng_file, weights_only=False)
        set_rng_state(state)
        client_state = dict(client_state or {}, _rng=state)
    return client_state or {}
