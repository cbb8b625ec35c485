"""Save and resume through DeepSpeed, made safe against crashes mid-save, damaged files and a
full disk.

DeepSpeed writes per-rank files and then `latest`, from rank 0, possibly before other ranks have
finished theirs. Here `save_latest=False` is passed, every rank also writes its RNG state, and a
save is a sequence of small steps (`save`): refuse it if the previous tag's size does not fit,
unmark the tag, write the files, make them durable and record each one's size and content
digest (each rank reads back its share), then rank 0 writes `complete.json` with that record
and the layout, moves `latest` atomically and prunes. A save into a tag that already has a
marker (a rerun from an older tag) removes the marker first, so a crash mid-save never leaves a
tag that looks complete. Resume takes the newest tag whose marker stands and whose files still
have their recorded sizes and contents, and warns about every tag it skips; a tag found damaged
in content is marked so (`damaged.json`) so that every rank and every later run skips it too.
The data position is the global consumed-sample count in the client state.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import yaml

from .. import errors
from ..config import Config, config_from_dict, config_to_dict, dump_config
from ..files import atomic_write, fsync_dir
from ..dims import ParallelDims
from ..resilience.faults import NO_FAULTS, Faults
from . import integrity

COMPLETE = "complete.json"
DAMAGED = "damaged.json"  # a marker moved aside: the tag's contents were found damaged
UNIVERSAL = "universal"  # a tag's universal form, when another layout resumed it (reshard.py)
TAG = re.compile(r"^global_step(\d+)$")
TEMP = re.compile(r"\.tmp")  # a file being written (files.atomic_write, async_save, _save_now)
# Model fields that may differ between a checkpoint and the run resuming it.
RESUMABLE_MODEL_CHANGES = {"dropout"}
# Settings that decide which sample comes at each global index: changing one on resume
# silently repeats some samples and skips others.
DATA_ORDER_KEYS = (("train", "seed"), ("data", "split"), ("data", "prefixes"),
                   ("data", "weights"))
LOW_SPACE_BYTES = 64 * 2 ** 20  # a write that failed with less free than this: a full disk


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


def complete_tags(ckpt_dir: str) -> List[str]:
    return [t for t in _tags_newest_first(ckpt_dir) if is_complete(ckpt_dir, t)]


def damage(ckpt_dir: str, tag: str, share: Optional[Tuple[int, int]] = (0, 1),
           log=None) -> Optional[str]:
    """Why a complete-marked tag cannot be loaded, or None: a recorded file missing or of
    another size (every file, a stat each), or, for this rank's `share` (rank, world) of the
    files, contents that differ from the recorded digest (share None: sizes only). Markers
    without sizes (older checkpoints) are taken on trust; a tag saved on node-local disks
    is checked for the files this node has (storage.agree_on_resume names what it lacks).
    `log` gets the verification's time."""
    try:
        marker = read_marker(ckpt_dir, tag)
    except (OSError, ValueError) as err:
        return f"unreadable {COMPLETE} ({err})"
    tag_dir = os.path.join(ckpt_dir, tag)
    recorded = marker.get("files", {})
    if not marker.get("shared", True):  # node-local disks: each node has its own ranks' files
        recorded = {n: e for n, e in recorded.items() if os.path.exists(os.path.join(tag_dir, n))}
    problem = integrity.size_problem(tag_dir, recorded)
    if problem or share is None:
        return problem
    names = integrity.share(integrity.digested(recorded), *share)
    start = time.monotonic()
    problem = integrity.content_problem(tag_dir, recorded, names)
    if problem is None and log and names:
        log(f"verified the contents of {tag} in {time.monotonic() - start:.2f} s: {len(names)} "
            f"of its {len(recorded)} files, {size_text(integrity.total_bytes(recorded, names))}"
            + (f" (this rank's share of {share[1]})" if share[1] > 1 else ""))
    return problem


def mark_damaged(ckpt_dir: str, tag: str, problem: str) -> None:
    """Move a tag's marker aside with the reason, so that no rank and no later run takes it
    (the files stay: a user who knows better can move damaged.json back to complete.json)."""
    tag_dir = os.path.join(ckpt_dir, tag)
    try:
        marker = read_marker(ckpt_dir, tag)
    except (OSError, ValueError):
        marker = {}
    atomic_write(os.path.join(tag_dir, DAMAGED), json.dumps(dict(marker, damage=problem)) + "\n")
    with contextlib.suppress(FileNotFoundError):  # another rank moved it first
        os.remove(os.path.join(tag_dir, COMPLETE))
    fsync_dir(tag_dir)


def step_of(tag: str) -> int:
    return int(TAG.match(tag).group(1))


def find_resume_tag(ckpt_dir: str, resume: str, log=print,
                    share: Optional[Tuple[int, int]] = (0, 1), warn=None,
                    at_most: Optional[int] = None) -> Optional[str]:
    """The tag to resume from: None for a fresh start. Every tag's files are checked for size;
    the chosen one's contents too, this rank's `share` of them (see damage; None: sizes only).
    A tag found damaged in content is marked damaged (mark_damaged): the other ranks, each
    checking another share, may have chosen it. `warn` says what this rank alone found
    (default: log). `at_most`: only tags of that step or earlier (a rollback's bound)."""
    if resume == "none":
        return None
    if resume != "auto":
        if not is_complete(ckpt_dir, resume):
            raise CheckpointError(f"checkpoint.resume={resume!r}: {ckpt_dir}/{resume} is missing "
                                  f"or incomplete (no {COMPLETE}); complete tags: "
                                  f"{complete_tags(ckpt_dir)}")
        problem = damage(ckpt_dir, resume, share, log)
        if problem:
            raise CheckpointError(f"checkpoint.resume={resume!r} is damaged: {problem}; resume "
                                  "from another tag (checkpoint.resume=auto takes the newest "
                                  "good one)")
        return resume
    for tag in _tags_newest_first(ckpt_dir):
        if at_most is not None and step_of(tag) > at_most:
            continue
        if not is_complete(ckpt_dir, tag):
            damaged = os.path.isfile(os.path.join(ckpt_dir, tag, DAMAGED))
            log(f"WARNING: skipping {'damaged' if damaged else 'incomplete'} checkpoint "
                f"{ckpt_dir}/{tag} " + (f"(marked in {DAMAGED})" if damaged else
                                        f"(no {COMPLETE}; a save was interrupted)"))
            continue
        problem = damage(ckpt_dir, tag, None)
        if problem:
            log(f"WARNING: skipping damaged checkpoint {ckpt_dir}/{tag}: {problem}")
            continue
        problem = damage(ckpt_dir, tag, share, log)
        if problem is None:
            return tag
        mark_damaged(ckpt_dir, tag, problem)
        (warn or log)(f"WARNING: skipping damaged checkpoint {ckpt_dir}/{tag}: {problem} (marked "
                      f"damaged: {DAMAGED})")
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


def data_order_changes(ckpt_dir: str, tag: str, cfg: Config) -> List[str]:
    """"KEY: checkpoint X, config Y" for each setting that orders the samples (DATA_ORDER_KEYS)
    and differs: the data position (a global sample index) then points into another order."""
    saved = config_to_dict(saved_config(os.path.join(ckpt_dir, tag)))
    current = config_to_dict(cfg)
    return [f"{section}.{key}: checkpoint {saved[section][key]!r}, config "
            f"{current[section][key]!r}"
            for section, key in DATA_ORDER_KEYS if saved[section][key] != current[section][key]]


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


def size_text(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _unmark(ckpt_dir: str, tag: str) -> None:
    """Make a tag incomplete before anything is written into it again; its universal form, if
    one was built, would describe the old contents. Temp files a killed save left behind go
    too (no rank writes into the tag before the barrier that follows)."""
    tag_dir = os.path.join(ckpt_dir, tag)
    shutil.rmtree(os.path.join(tag_dir, UNIVERSAL), ignore_errors=True)
    markers = [os.path.join(tag_dir, m) for m in (COMPLETE, DAMAGED)]
    if any(os.path.exists(m) for m in markers):
        for marker in markers:
            with contextlib.suppress(FileNotFoundError):
                os.remove(marker)
        fsync_dir(tag_dir)  # the removal is on disk before any file of the tag changes
    for name in os.listdir(tag_dir) if os.path.isdir(tag_dir) else []:
        if TEMP.search(name) and os.path.isfile(os.path.join(tag_dir, name)):
            os.remove(os.path.join(tag_dir, name))


def _not_a_saved_file(name: str) -> bool:
    """Entries of a tag directory that the save did not write: its markers, and the universal
    form with its temp, lock and failure files (reshard.py)."""
    return name in (COMPLETE, DAMAGED) or name.startswith(UNIVERSAL)


def record_tag(tag_dir: str) -> Dict[str, dict]:
    """The record of a tag's files, by one process (save() shares the reading among ranks)."""
    return integrity.record(tag_dir, integrity.list_files(tag_dir, _not_a_saved_file))


def _tag_bytes(ckpt_dir: str, tag: str) -> int:
    """What a tag's files take (its marker's record; a walk for an unmarked one)."""
    if is_complete(ckpt_dir, tag):
        with contextlib.suppress(OSError, ValueError):
            return integrity.total_bytes(read_marker(ckpt_dir, tag).get("files", {}))
    root = os.path.join(ckpt_dir, tag)
    return sum(os.path.getsize(os.path.join(root, n))
               for n in integrity.list_files(root, _not_a_saved_file))


def space_needed(ckpt_dir: str, tag: str) -> Tuple[int, Optional[str]]:
    """(bytes, the tag it is measured on): a save of `tag` needs about what the newest other
    complete tag took; (0, None) before the first save. Rewriting `tag` reuses its space."""
    before = [t for t in complete_tags(ckpt_dir) if t != tag]
    if not before:
        return 0, None
    return _tag_bytes(ckpt_dir, before[0]), before[0]


def space_shortfall(ckpt_dir: str, tag: str) -> Optional[str]:
    """Why the filesystem cannot hold a save of `tag` (its free space is less than the
    previous tag took), or None."""
    needed, measured_on = space_needed(ckpt_dir, tag)
    if not needed:
        return None
    reusable = _tag_bytes(ckpt_dir, tag) if os.path.isdir(os.path.join(ckpt_dir, tag)) else 0
    free = _free_bytes(ckpt_dir)
    if free + reusable >= needed:
        return None
    return (f"no space left on {ckpt_dir} (needs about {size_text(needed)} for {tag}, as "
            f"{measured_on} took; {size_text(free)} free): nothing was written. Free space (or "
            f"lower checkpoint.keep_last) and rerun; the run resumes from {measured_on}")


def check_space(ckpt_dir: str, tag: str) -> None:
    """Collective: refuse, on every rank, a save that would fill the disk (rank 0 measures)."""
    verdict = [space_shortfall(ckpt_dir, tag) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise errors.NoSpaceError(verdict[0])


def _free_bytes(path: str) -> int:
    """Free space on the filesystem of path (or of its nearest existing parent)."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def _out_of_space(err: BaseException, ckpt_dir: str, needed: int) -> bool:
    """Whether a failed write ran out of space: the OS said so, or (torch's writer reports a
    full disk as "basic_ios::clear: iostream error" or "unexpected pos", without an errno)
    the filesystem has less free than the save needs."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return _free_bytes(ckpt_dir) < max(needed, LOW_SPACE_BYTES)


@contextlib.contextmanager
def full_disk_as_no_space(ckpt_dir: str, tag: str):
    """Turn a write that ran out of space into NoSpaceError naming the directory and the size
    needed; the partial tag stays unmarked (the next run resumes from the previous one)."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        needed, measured_on = space_needed(ckpt_dir, tag)
        if not _out_of_space(err, ckpt_dir, needed):
            raise
        written = _tag_bytes(ckpt_dir, tag)
        need = (f"needs about {size_text(needed)}, as {measured_on} took" if needed else
                f"needs more than the {size_text(written)} written before it ran out")
        raise errors.NoSpaceError(
            f"no space left on {ckpt_dir} ({need}; {size_text(_free_bytes(ckpt_dir))} "
            f"free) while saving {tag} ({type(err).__name__}: {str(err)[:200]}). {tag} is not "
            f"marked complete; free space (or lower checkpoint.keep_last) and rerun to resume "
            f"from {measured_on or 'the start'}") from err


def _save_now(obj, path: str) -> None:
    """torch.save under a temp name, then the rename (a synchronous save's small files)."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def write_files(engine, ckpt_dir: str, tag: str, client_state: dict, cfg: Config,
                extra_rng: Optional[dict], save_file: Callable[[object, str], None] = _save_now
                ) -> None:
    """Collective: DeepSpeed's files of the tag, this rank's RNG state (through `save_file`:
    a background save hands it to its writer) and (rank 0) the resolved config."""
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    rng = rng_state()
    rng.update(extra_rng or {})
    save_file(rng, _rng_path(ckpt_dir, tag, dist.get_rank()))
    if dist.get_rank() == 0:
        dump_config(cfg, os.path.join(ckpt_dir, tag, "config.yaml"))


def write_marker(ckpt_dir: str, tag: str, step: int, client_state: dict, dims: ParallelDims,
                 files: Dict[str, dict], shared: bool = True) -> None:
    """complete.json: the tag is whole, with what resuming it needs to know. `shared`: every
    rank saw every file (False on node-local disks, where each node holds its ranks' files)."""
    marker = {"step": step, "world_size": dist.get_world_size(), "time": time.time(),
              "consumed_samples": client_state.get("consumed_samples"),
              "train_samples": client_state.get("train_samples"),
              "layout": dims.layout, "shared": shared, "digest": integrity.DIGEST,
              "files": files}
    atomic_write(os.path.join(ckpt_dir, tag, COMPLETE), json.dumps(marker) + "\n")


def write_latest(ckpt_dir: str, tag: str) -> None:
    """`latest`, which DeepSpeed's own tools (zero_to_fp32.py) read, moved atomically."""
    atomic_write(os.path.join(ckpt_dir, "latest"), tag)


def prepare_save(ckpt_dir: str, tag: str) -> None:
    """Collective, before a save writes anything: refuse it if the disk cannot hold it; make
    the tag incomplete (rank 0)."""
    check_space(ckpt_dir, tag)
    if dist.get_rank() == 0:
        _unmark(ckpt_dir, tag)
    dist.barrier()


def finish_save(ckpt_dir: str, tag: str, step: int, client_state: dict, dims: ParallelDims,
                keep_last: int, known: Optional[Dict[str, dict]] = None
                ) -> Tuple[Dict[str, dict], float]:
    """Collective, once every rank's files of the tag are written: make them durable and
    record their sizes and digests (`known`: this rank's, done already), then rank 0 writes
    the marker, moves `latest` and prunes. -> (the record, this rank's digest seconds)."""
    files, shared, digest_seconds = integrity.record_collectively(
        os.path.join(ckpt_dir, tag), skip=_not_a_saved_file, known=known)
    if dist.get_rank() == 0:
        with full_disk_as_no_space(ckpt_dir, tag):
            write_marker(ckpt_dir, tag, step, client_state, dims, files, shared)
            write_latest(ckpt_dir, tag)
        prune(ckpt_dir, keep_last)
    dist.barrier()
    return files, digest_seconds


def save(engine, ckpt_dir: str, step: int, client_state: dict, cfg: Config, dims: ParallelDims,
         keep_last: int, extra_rng: Optional[dict] = None, faults: Faults = NO_FAULTS,
         log=None) -> str:
    """Collective: every rank calls it. Returns the tag. The marker records dims' layout. A
    disk too full for it raises NoSpaceError (before writing when the previous tag's size
    says so, else when a write fails)."""
    tag = tag_for(step)
    start = time.monotonic()
    prepare_save(ckpt_dir, tag)
    with full_disk_as_no_space(ckpt_dir, tag):
        write_files(engine, ckpt_dir, tag, client_state, cfg, extra_rng)
    faults.inject("kill_in_save", dist.get_rank(), step)
    dist.barrier()  # every rank's files are written
    files, digest_seconds = finish_save(ckpt_dir, tag, step, client_state, dims, keep_last)
    if log:
        log(f"saved checkpoint {ckpt_dir}/{tag} in {time.monotonic() - start:.2f} s "
            f"({size_text(integrity.total_bytes(files))}; durable and digested in "
            f"{digest_seconds:.2f} s)")
    return tag


def prune(ckpt_dir: str, keep_last: int) -> None:
    """Keep the newest keep_last complete tags; drop older ones and stale incomplete (or
    damaged) ones."""
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
