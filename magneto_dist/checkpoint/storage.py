"""Where the checkpoints live, as the ranks see them: one directory that every rank sees (a
shared filesystem: supported), or one per node (node-local disks: training and saving work,
resuming does not: rank 0 alone writes complete.json and prunes, and each node holds only the
files its own ranks wrote).

Each rank picks its resume tag alone, before the process group exists (the data's size and a
layout change's universal form depend on it). Once the group has formed, `agree_on_resume`
checks that every rank picked rank 0's tag. Without it, a node that saw no checkpoint started
fresh while rank 0 resumed: a hang, or two halves of one model trained from different states.
"""
from __future__ import annotations

import os
import socket
import uuid
from typing import Dict, List, Optional

import torch.distributed as dist

from ..errors import CheckpointError, MagnetoError, RestartNeeded
from .tags import COMPLETE, DAMAGED, CheckpointDir


def _ranks_text(ranks: List[int]) -> str:
    """[2, 3, 4, 7] -> "ranks 2-4, 7"."""
    spans, start = [], ranks[0]
    for prev, cur in zip(ranks, ranks[1:] + [None]):
        if cur != prev + 1:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(spans)}"


def _gather(value) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _broadcast(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def ranks_blind_to_rank0(ckpt_dir: str) -> Dict[str, List[int]]:
    """Collective: {host: ranks} that do not see a file rank 0 just wrote into ckpt_dir (empty
    on a shared filesystem). A lookup by name, which NFS answers from the server, not from a
    cached directory listing."""
    # the name only: each rank looks in its own ckpt_dir (the same path on every node)
    probe = os.path.join(ckpt_dir, _broadcast(f".shared-probe-{uuid.uuid4().hex}"))
    if dist.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        with open(probe, "w", encoding="utf-8") as f:
            f.write(socket.gethostname() + "\n")
    dist.barrier()
    views = _gather((socket.gethostname(), os.path.exists(probe)))
    dist.barrier()
    if dist.get_rank() == 0:
        os.remove(probe)
    blind: Dict[str, List[int]] = {}
    for rank, (host, sees) in enumerate(views):
        if not sees:
            blind.setdefault(host, []).append(rank)
    return blind


def _view(ckpts: CheckpointDir, tag: Optional[str], chosen: Optional[str],
          files: List[str]) -> dict:
    """What this rank sees of rank 0's choice `chosen`, beside its own choice `tag`."""
    seen = ckpts.tag(chosen) if chosen else None
    return {"host": socket.gethostname(), "tag": tag,
            "complete": seen is not None and seen.is_complete(),
            "damaged": seen is not None and seen.is_damaged(),
            "missing": [n for n in files if seen is None
                        or not os.path.isfile(os.path.join(seen.path, n))]}


def _disagreement(ckpt_dir: str, chosen: Optional[str], views: List[dict],
                  files: List[str]) -> MagnetoError:
    """The error that ends a run whose ranks chose differently."""
    first = f"rank 0 on {views[0]['host']} resumes " + (chosen or "nothing (a fresh start)")
    if any(v["damaged"] for v in views):
        return RestartNeeded(f"{first}, which another rank found damaged since (and marked so "
                             f"in {DAMAGED}: see its warning); the restart resumes from the "
                             "previous complete checkpoint")
    if chosen and all(v["complete"] and not v["missing"] for v in views):
        return RestartNeeded(f"{first}, which some ranks did not list when they chose (a stale "
                             "directory listing); every rank sees it now: restart")
    groups: Dict[tuple, List[int]] = {}
    for rank, v in enumerate(views):
        if v["tag"] != chosen:
            groups.setdefault((v["host"], v["tag"], v["complete"], len(v["missing"]),
                               tuple(v["missing"][:3])), []).append(rank)
    lines = []
    for (host, tag, complete, missing, examples), ranks in groups.items():
        lacks = [] if complete or not chosen else [f"{chosen}/{COMPLETE}"]
        if missing:
            lacks.append(f"{missing} of its {len(files)} files ({', '.join(examples)}"
                         f"{', ...' if missing > len(examples) else ''})")
        lines.append(f"{host} ({_ranks_text(ranks)}) would "
                     + (f"resume {tag}" if tag else "start fresh")
                     + (f": it lacks {' and '.join(lacks)}" if lacks else ""))
    return CheckpointError(
        f"the ranks do not see the same checkpoints in {ckpt_dir}: {first}; {'; '.join(lines)}. "
        "Every rank must see one checkpoint directory: put logging.run_dir on a filesystem "
        "that all nodes share (node-local disks cannot resume: rank 0 alone marks and prunes "
        "checkpoints, and each node holds only its own ranks' files)")


def agree_on_resume(ckpts: CheckpointDir, tag: Optional[str],
                    log=print) -> Optional[MagnetoError]:
    """Collective, once the process group has formed: None when every rank chose rank 0's
    resume tag (`tag` is this rank's choice); else the error to stop with, the same on every
    rank: RestartNeeded when a restart resolves it, else CheckpointError naming each host that
    differs and what it lacks. Warns (rank 0) when the directory is not shared."""
    chosen = _broadcast(tag)
    files = _broadcast(sorted(ckpts.tag(chosen).marker().get("files", {}))
                       if dist.get_rank() == 0 and chosen else [])
    views = _gather(_view(ckpts, tag, chosen, files))
    blind = ranks_blind_to_rank0(ckpts.path)
    if all(v["tag"] == chosen for v in views):
        if blind:
            log(f"WARNING: {ckpts.path} is not shared by all nodes: "
                + "; ".join(f"{host} ({_ranks_text(r)})" for host, r in blind.items())
                + " do not see rank 0's files. Training and saving work, but a restart cannot "
                "resume: rank 0 alone marks and prunes checkpoints, and each node keeps only "
                "its own ranks' files. Use a filesystem shared by all nodes")
        return None
    return _disagreement(ckpts.path, chosen, views, files)
