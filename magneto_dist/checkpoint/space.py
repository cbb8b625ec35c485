"""The disk space a save needs: a save the filesystem cannot hold is refused before it writes a
byte, and a write that runs out of space anyway ends in NoSpaceError (exit 74, not retried)
naming the directory and the size needed, with the partial tag left unmarked, so the next run
resumes from the previous one.

A save of a tag needs about what the newest other complete tag took (the model and optimizer
do not grow); rewriting a tag reuses its own space.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from typing import Optional, Tuple

import torch.distributed as dist

from .. import errors
from .integrity import size_text
from .tags import Tag

LOW_SPACE_BYTES = 64 * 2 ** 20  # a write that failed with less free than this: a full disk


def space_needed(tag: Tag) -> Tuple[int, Optional[str]]:
    """(bytes, the tag it is measured on): a save of `tag` needs about what the newest other
    complete tag took; (0, None) before the first save."""
    before = [name for name in tag.ckpts.complete_tags() if name != tag.name]
    if not before:
        return 0, None
    return tag.ckpts.tag(before[0]).size(), before[0]


def free_bytes(path: str) -> int:
    """Free space on the filesystem of path (or of its nearest existing parent)."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def space_shortfall(tag: Tag) -> Optional[str]:
    """Why the filesystem cannot hold a save of `tag` (its free space is less than the
    previous tag took), or None."""
    needed, measured_on = space_needed(tag)
    if not needed:
        return None
    reusable = tag.size() if os.path.isdir(tag.path) else 0
    free = free_bytes(tag.ckpts.path)
    if free + reusable >= needed:
        return None
    return (f"no space left on {tag.ckpts.path} (needs about {size_text(needed)} for "
            f"{tag.name}, as {measured_on} took; {size_text(free)} free): nothing was written. "
            f"Free space (or lower checkpoint.keep_last) and rerun; the run resumes from "
            f"{measured_on}")


def check_space(tag: Tag) -> None:
    """Collective: refuse, on every rank, a save that would fill the disk (rank 0 measures)."""
    verdict = [space_shortfall(tag) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise errors.NoSpaceError(verdict[0])


def _out_of_space(err: BaseException, ckpt_dir: str, needed: int) -> bool:
    """Whether a failed write ran out of space: the OS said so, or (torch's writer reports a
    full disk as "basic_ios::clear: iostream error" or "unexpected pos", without an errno)
    the filesystem has less free than the save needs."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return free_bytes(ckpt_dir) < max(needed, LOW_SPACE_BYTES)


@contextlib.contextmanager
def full_disk_as_no_space(tag: Tag):
    """Turn a write of `tag` that ran out of space into NoSpaceError naming the directory and
    the size needed; the partial tag stays unmarked (the next run resumes from the previous
    one)."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        ckpt_dir = tag.ckpts.path
        needed, measured_on = space_needed(tag)
        if not _out_of_space(err, ckpt_dir, needed):
            raise
        written = tag.size()
        need = (f"needs about {size_text(needed)}, as {measured_on} took" if needed else
                f"needs more than the {size_text(written)} written before it ran out")
        raise errors.NoSpaceError(
            f"no space left on {ckpt_dir} ({need}; {size_text(free_bytes(ckpt_dir))} "
            f"free) while saving {tag.name} ({type(err).__name__}: {str(err)[:200]}). "
            f"{tag.name} is not marked complete; free space (or lower checkpoint.keep_last) "
            f"and rerun to resume from {measured_on or 'the start'}") from err
