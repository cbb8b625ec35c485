"""A run's checkpoint directory and its tags: which tags are complete, which are damaged, what
each one's marker says, and which are pruned (torchtitan's CheckpointManager owns its folder the
same way). Saving and loading are manager.py's, the free space a save needs space.py's, and the
choice of the tag to resume from resume.py's.

    RUN_DIR/checkpoints/            a CheckpointDir
        latest                      the newest complete tag, for DeepSpeed's own tools
        global_step4/               a Tag: DeepSpeed's per-rank files, rng_rankNNNNN.pt,
            config.yaml             the resolved config,
            complete.json           the marker: written last, with every file's size and digest
            damaged.json            (instead of complete.json) a marker moved aside: found damaged
            universal/              its universal form, when another layout resumed it

A tag whose marker stands and whose files still have their recorded sizes and contents can be
resumed; a tag found damaged in content is marked so (`damaged.json`) so that every rank and
every later run skips it too.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import yaml

from .. import errors
from ..config import Config, config_from_dict, config_to_dict
from ..dims import ParallelDims
from ..files import atomic_write, fsync_dir
from . import integrity

CHECKPOINTS = "checkpoints"  # a run's checkpoint directory, inside logging.run_dir
COMPLETE = "complete.json"
DAMAGED = "damaged.json"  # a marker moved aside: the tag's contents were found damaged
UNIVERSAL = "universal"  # a tag's universal form, when another layout resumed it (reshard.py)
TAG = re.compile(r"^global_step(\d+)$")
TEMP = re.compile(r"\.tmp")  # a file being written (files.atomic_write, async_save, _save_now)
# Model fields that may differ between a checkpoint and the run resuming it.
RESUMABLE_MODEL_CHANGES = {"dropout"}

CheckpointError = errors.CheckpointError  # raised by the checkpoint code, read by its callers


def tag_for(step: int) -> str:
    return f"global_step{step}"


def saved_config(tag_dir: str) -> Config:
    """The resolved config saved beside a checkpoint."""
    with open(os.path.join(tag_dir, "config.yaml"), encoding="utf-8") as f:
        return config_from_dict(yaml.safe_load(f))


def model_differences(saved_model: dict, cfg: Config) -> List[str]:
    """"model.KEY: checkpoint X, config Y" for every model field that may not change."""
    current = config_to_dict(cfg)["model"]
    return [f"model.{k}: checkpoint {saved_model.get(k)!r}, config {current[k]!r}"
            for k in current
            if k not in RESUMABLE_MODEL_CHANGES and saved_model.get(k) != current[k]]


def not_a_saved_file(name: str) -> bool:
    """Entries of a tag directory that the save did not write: its markers, and the universal
    form with its temp, lock and failure files (reshard.py)."""
    return name in (COMPLETE, DAMAGED) or name.startswith(UNIVERSAL)


def record_tag(tag_dir: str) -> Dict[str, dict]:
    """The record of a tag's files, by one process (a save shares the reading among ranks)."""
    return integrity.record(tag_dir, integrity.list_files(tag_dir, not_a_saved_file))


@dataclass(frozen=True)
class CheckpointDir:
    """A run's checkpoint directory: its tags, newest first, and their pruning."""
    path: str

    @classmethod
    def of_run(cls, run_dir: str) -> "CheckpointDir":
        return cls(os.path.join(run_dir, CHECKPOINTS))

    def tag(self, name: str) -> "Tag":
        return Tag(self, name)

    def at_step(self, step: int) -> "Tag":
        return Tag(self, tag_for(step))

    def tag_names(self) -> List[str]:
        """Every global_stepN directory, complete or not, newest first."""
        if not os.path.isdir(self.path):
            return []
        names = [d for d in os.listdir(self.path) if TAG.match(d)]
        return sorted(names, key=lambda d: int(TAG.match(d).group(1)), reverse=True)

    def complete_tags(self) -> List[str]:
        return [name for name in self.tag_names() if self.tag(name).is_complete()]

    def prune(self, keep_last: int) -> None:
        """Keep the newest keep_last complete tags; drop older ones and stale incomplete (or
        damaged) ones."""
        names = self.tag_names()
        complete = [name for name in names if self.tag(name).is_complete()]
        if not complete:
            return
        keep = set(complete[:keep_last])
        oldest_kept = self.tag(complete[:keep_last][-1]).step
        for name in names:
            if name not in keep and self.tag(name).step < oldest_kept:
                shutil.rmtree(self.tag(name).path, ignore_errors=True)


@dataclass(frozen=True)
class Tag:
    """One checkpoint (global_stepN, or a tag's universal form) in its directory."""
    ckpts: CheckpointDir
    name: str

    @classmethod
    def at(cls, tag_dir: str) -> "Tag":
        """The tag whose directory is tag_dir (a tool's --input or --checkpoint)."""
        parent, name = os.path.split(tag_dir.rstrip("/"))
        return cls(CheckpointDir(parent), name)

    @property
    def path(self) -> str:
        return os.path.join(self.ckpts.path, self.name)

    @property
    def label(self) -> str:
        """How messages name it: CKPT_DIR/global_stepN."""
        return f"{self.ckpts.path}/{self.name}"

    @property
    def step(self) -> int:
        return int(TAG.match(self.name).group(1))

    def is_complete(self) -> bool:
        return os.path.isfile(os.path.join(self.path, COMPLETE))

    def is_damaged(self) -> bool:
        return os.path.isfile(os.path.join(self.path, DAMAGED))

    def marker(self) -> dict:
        with open(os.path.join(self.path, COMPLETE), encoding="utf-8") as f:
            return json.load(f)

    def config(self) -> Config:
        return saved_config(self.path)

    def layout(self) -> dict:
        """From the marker; for checkpoints older than the marker's "layout", from the saved
        config and the marker's world size."""
        marker = self.marker()
        if "layout" in marker:
            return marker["layout"]
        return ParallelDims.of(self.config(), marker["world_size"]).layout

    def damage(self, share: Optional[Tuple[int, int]] = (0, 1), log=None) -> Optional[str]:
        """Why a complete-marked tag cannot be loaded, or None: a recorded file missing or of
        another size (every file, a stat each), or, for this rank's `share` (rank, world) of
        the files, contents that differ from the recorded digest (share None: sizes only).
        Markers without sizes (older checkpoints) are taken on trust; a tag saved on
        node-local disks is checked for the files this node has (storage.agree_on_resume
        names what it lacks). `log` gets the verification's time."""
        try:
            marker = self.marker()
        except (OSError, ValueError) as err:
            return f"unreadable {COMPLETE} ({err})"
        recorded = marker.get("files", {})
        if not marker.get("shared", True):  # node-local disks: each node has its ranks' files
            recorded = {n: e for n, e in recorded.items()
                        if os.path.exists(os.path.join(self.path, n))}
        problem = integrity.size_problem(self.path, recorded)
        if problem or share is None:
            return problem
        names = integrity.share(integrity.digested(recorded), *share)
        start = time.monotonic()
        problem = integrity.content_problem(self.path, recorded, names)
        if problem is None and log and names:
            log(f"verified the contents of {self.name} in {time.monotonic() - start:.2f} s: "
                f"{len(names)} of its {len(recorded)} files, "
                f"{integrity.size_text(integrity.total_bytes(recorded, names))}"
                + (f" (this rank's share of {share[1]})" if share[1] > 1 else ""))
        return problem

    def mark_damaged(self, problem: str) -> None:
        """Move the marker aside with the reason, so that no rank and no later run takes the
        tag (the files stay: a user who knows better can move damaged.json back to
        complete.json)."""
        try:
            marker = self.marker()
        except (OSError, ValueError):
            marker = {}
        atomic_write(os.path.join(self.path, DAMAGED),
                     json.dumps(dict(marker, damage=problem)) + "\n")
        with contextlib.suppress(FileNotFoundError):  # another rank moved it first
            os.remove(os.path.join(self.path, COMPLETE))
        fsync_dir(self.path)

    def unmark(self) -> None:
        """Make the tag incomplete before anything is written into it again; its universal
        form, if one was built, would describe the old contents. Temp files a killed save left
        behind go too (no rank writes into the tag before the barrier that follows)."""
        shutil.rmtree(os.path.join(self.path, UNIVERSAL), ignore_errors=True)
        markers = [os.path.join(self.path, m) for m in (COMPLETE, DAMAGED)]
        if any(os.path.exists(m) for m in markers):
            for marker in markers:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(marker)
            fsync_dir(self.path)  # the removal is on disk before any file of the tag changes
        for name in os.listdir(self.path) if os.path.isdir(self.path) else []:
            if TEMP.search(name) and os.path.isfile(os.path.join(self.path, name)):
                os.remove(os.path.join(self.path, name))

    def size(self) -> int:
        """What the tag's files take (its marker's record; a walk for an unmarked tag)."""
        if self.is_complete():
            with contextlib.suppress(OSError, ValueError):
                return integrity.total_bytes(self.marker().get("files", {}))
        return sum(os.path.getsize(os.path.join(self.path, n))
                   for n in integrity.list_files(self.path, not_a_saved_file))
