"""Save and resume through DeepSpeed, made safe against crashes mid-save.

DeepSpeed writes per-rank files and then `latest`, from rank 0, possibly before other ranks have
finished theirs. Here `save_latest=False` is passed, every rank also writes its RNG state, and
only after a barrier does rank 0 write `complete.json` into the tag directory and move `latest`
atomically. The marker records every file's size and the layout that wrote the tag. A save into
a tag that already has a marker (a rerun from an older tag) removes the marker first, so a crash
mid-save never leaves a tag that looks complete. Resume takes the newest tag whose marker stands
and whose files still have their recorded sizes, and warns about every tag it skips. The data
position is the global consumed-sample count in the client state.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml

from .. import errors
from ..config import Config, config_from_dict, config_to_dict, dump_config
from ..files import atomic_write
from ..dims import ParallelDims
from ..resilience.faults import NO_FAULTS, Faults

COMPLETE = "complete.json"
UNIVERSAL = "universal"  # a tag's universal form, when another layout resumed it (reshard.py)
TAG = re.compile(r"^global_step(\d+)$")
# Model fields that may differ between a checkpoint and the run resuming it.
RESUMABLE_MODEL_CHANGES = {"dropout"}


CheckpointError = errors.CheckpointError  # raised by the checkpoint code, read by its callers


def tag_for(step: int) -> str:
    return f"global_step{step}"


def _tags_newest_first(ckpt_dir: str) -> List[str]:
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [d for d in os.listdir(ckpt_dir) if TAG.match(d)]
    return sorted(tags, key=lambda d: int(TAG.match(d).group(1)), reverse=True)


def is_complete(ckpt_dir: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, tag, COMPLETE))


def read_marker(ckpt_dir: str, tag: str) -> dict:
    with open(os.path.join(ckpt_dir, tag, COMPLETE), encoding="utf-8") as f:
        return json.load(f)


def _file_sizes(tag_dir: str) -> Dict[str, int]:
    return {os.path.relpath(os.path.join(root, name), tag_dir):
            os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(tag_dir) for name in names if name != COMPLETE}


def damage(ckpt_dir: str, tag: str) -> Optional[str]:
    """Why a complete-marked tag cannot be loaded (a file missing or of another size than when it
    was saved), or None. Markers without sizes (older checkpoints) are taken on trust."""
    try:
        recorded = read_marker(ckpt_dir, tag).get("files", {})
    except (OSError, ValueError) as err:
        return f"unreadable {COMPLETE} ({err})"
    tag_dir = os.path.join(ckpt_dir, tag)
    for name, size in sorted(recorded.items()):
        path = os.path.join(tag_dir, name)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != size:
            return f"{path} has {os.path.getsize(path)} bytes, {size} when saved"
    return None


def find_resume_tag(ckpt_dir: str, resume: str, log=print) -> Optional[str]:
    """The tag to resume from: None for a fresh start."""
    if resume == "none":
        return None
    if resume != "auto":
        if not is_complete(ckpt_dir, resume):
            raise CheckpointError(f"checkpoint.resume={resume!r}: {ckpt_dir}/{resume} is missing "
                                  f"or incomplete (no {COMPLETE}); complete tags: "
                                  f"{[t for t in _tags_newest_first(ckpt_dir) if is_complete(ckpt_dir, t)]}")
        problem = damage(ckpt_dir, resume)
        if problem:
            raise CheckpointError(f"checkpoint.resume={resume!r} is damaged: {problem}; resume "
                                  "from another tag (checkpoint.resume=auto takes the newest "
                                  "good one)")
        return resume
    for tag in _tags_newest_first(ckpt_dir):
        if not is_complete(ckpt_dir, tag):
            log(f"WARNING: skipping incomplete checkpoint {ckpt_dir}/{tag} (no {COMPLETE}; a save "
                "was interrupted)")
            continue
        problem = damage(ckpt_dir, tag)
        if problem is None:
            return tag
        log(f"WARNING: skipping damaged checkpoint {ckpt_dir}/{tag}: {problem}")
    return None


def saved_config(tag_dir: str) -> Config:
    """The resolved config saved beside a checkpoint."""
    with open(os.path.join(tag_dir, "config.yaml"), encoding="utf-8") as f:
        return config_from_dict(yaml.safe_load(f))


def saved_layout(ckpt_dir: str, tag: str) -> dict:
    """From the marker; for checkpoints older than the marker's "layout", from the saved config
    and the marker's world size."""
    marker = read_marker(ckpt_dir, tag)
    if "layout" in marker:
        return marker["layout"]
    return ParallelDims.of(saved_config(os.path.join(ckpt_dir, tag)), marker["world_size"]).layout


def model_differences(saved_model: dict, cfg: Config) -> List[str]:
    """"model.KEY: checkpoint X, config Y" for every model field that may not change."""
    current = config_to_dict(cfg)["model"]
    return [f"model.{k}: checkpoint {saved_model.get(k)!r}, config {current[k]!r}"
            for k in current
            if k not in RESUMABLE_MODEL_CHANGES and saved_model.get(k) != current[k]]


def check_compatible(ckpt_dir: str, tag: str, cfg: Config) -> None:
    """Refuse a checkpoint whose model differs from the configured one, naming the fields."""
    with open(os.path.join(ckpt_dir, tag, "config.yaml"), encoding="utf-8") as f:
        diffs = model_differences(yaml.safe_load(f)["model"], cfg)
    if diffs:
        raise CheckpointError(f"checkpoint {ckpt_dir}/{tag} was written by a different model; "
                              f"{'; '.join(diffs)}. Use a new logging.run_dir, or "
                              "checkpoint.resume=none to start over")


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


def _rng_path(ckpt_dir: str, tag: str, rank: int) -> str:
    return os.path.join(ckpt_dir, tag, f"rng_rank{rank:05d}.pt")


def _unmark(ckpt_dir: str, tag: str) -> None:
    """Make a tag incomplete before anything is written into it again; its universal form, if
    one was built, would describe the old contents."""
    marker = os.path.join(ckpt_dir, tag, COMPLETE)
    shutil.rmtree(os.path.join(ckpt_dir, tag, UNIVERSAL), ignore_errors=True)
    if os.path.exists(marker):
        os.remove(marker)
        fd = os.open(os.path.dirname(marker), os.O_RDONLY)
        try:
            os.fsync(fd)  # the removal is on disk before any file of the tag changes
        finally:
            os.close(fd)


def save(engine, ckpt_dir: str, step: int, client_state: dict, cfg: Config, dims: ParallelDims,
         keep_last: int, extra_rng: Optional[dict] = None, faults: Faults = NO_FAULTS) -> str:
    """Collective: every rank calls it. Returns the tag. The marker records dims' layout."""
    tag = tag_for(step)
    rank = dist.get_rank()
    if rank == 0:
        _unmark(ckpt_dir, tag)
    dist.barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    rng = rng_state()
    rng.update(extra_rng or {})
    path = _rng_path(ckpt_dir, tag, rank)
    torch.save(rng, path + ".tmp")
    os.replace(path + ".tmp", path)
    faults.inject("kill_in_save", rank, step)
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        dump_config(cfg, os.path.join(ckpt_dir, tag, "config.yaml"))
        marker = {"step": step, "world_size": dist.get_world_size(), "time": time.time(),
                  "consumed_samples": client_state.get("consumed_samples"),
                  "layout": dims.layout,
                  "files": _file_sizes(os.path.join(ckpt_dir, tag))}
        atomic_write(os.path.join(ckpt_dir, tag, COMPLETE), json.dumps(marker) + "\n")
        atomic_write(os.path.join(ckpt_dir, "latest"), tag)  # DeepSpeed's tools read this
        prune(ckpt_dir, keep_last)
    dist.barrier()
    return tag


def prune(ckpt_dir: str, keep_last: int) -> None:
    """Keep the newest keep_last complete tags; drop older ones and stale incomplete ones."""
    tags = _tags_newest_first(ckpt_dir)
    complete = [t for t in tags if is_complete(ckpt_dir, t)]
    if not complete:
        return
    keep = set(complete[:keep_last])
    oldest_kept = int(TAG.match(complete[: keep_last][-1]).group(1))
    for tag in tags:
        if tag not in keep and int(TAG.match(tag).group(1)) < oldest_kept:
            shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)


def load(engine, ckpt_dir: str, tag: str, load_optimizer: bool = True) -> dict:
    """Collective: load engine state; restore this rank's RNG if it saved one. -> client state."""
    try:
        path, client_state = engine.load_checkpoint(
            ckpt_dir, tag=tag, load_optimizer_states=load_optimizer,
            load_lr_scheduler_states=load_optimizer)
    except (EOFError, RuntimeError, OSError, KeyError) as err:
        raise CheckpointError(f"could not load {ckpt_dir}/{tag} ({type(err).__name__}: "
                              f"{str(err)[:300]}); move that directory aside and rerun to resume "
                              "from the previous checkpoint") from err
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt_dir}/{tag}")
    rng_file = _rng_path(ckpt_dir, tag, dist.get_rank())
    if os.path.isfile(rng_file):  # absent when the layout changed: keep the seeded state
        state = torch.load(rng_file, weights_only=False)
        set_rng_state(state)
        client_state = dict(client_state or {}, _rng=state)
    return client_state or {}
