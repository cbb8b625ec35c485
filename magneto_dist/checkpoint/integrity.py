"""Content digests of checkpoint files: recorded when a tag (or its universal form) is written,
verified before it is used, so a damaged file is found by name instead of training on it.

Sizes alone missed corruption that keeps the size (64 KiB of random bytes inside an optimizer
file resumed, trained on NaN and stopped with exit 4 blaming the data). The digest is xxHash's
XXH3-64: the job is to catch accidental damage (bit rot, a torn copy, a bad disk), not an
attacker, so a cryptographic hash buys nothing. Reading and hashing the files of a 1.4 GB
checkpoint (tools/bench_convert.py --digests-only, 2-core CPU, warm page cache): XXH3-64
12.9 GiB/s, zlib.crc32 3.1, adler32 2.7, sha256 1.5, blake2b 0.8 (on a busy machine 7.3, 2.9,
2.6, 0.66, 0.42). `xxhash` is the package that `datasets` already needs (pinned in
requirements.txt for this use).

A record is {relative path: {"size": bytes, "xxh3_64": hex}}; records written before digests
existed hold a bare size, which is checked alone.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch.distributed as dist
import xxhash

from ..files import fsync_dir

DIGEST = "xxh3_64"
_CHUNK = 8 * 2 ** 20  # read size: large enough that per-call overhead vanishes


def file_digest(path: str, durable: bool = False) -> str:
    """The file's XXH3-64 as 16 hex digits; with `durable`, also fsync it (the data of a
    file another process wrote is on disk after this returns)."""
    digest, buffer = xxhash.xxh3_64(), bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
        if durable:
            os.fsync(f.fileno())
    return digest.hexdigest()


def buffer_digest(data) -> str:
    """The digest of bytes in memory (anything with the buffer protocol)."""
    return xxhash.xxh3_64(data).hexdigest()


def list_files(root: str, skip: Callable[[str], bool] = lambda top: False) -> List[str]:
    """Every regular file under root (links not followed), as sorted relative paths, leaving
    out the entries of root for which skip(name) is true and everything under them."""
    found = []
    for parent, dirs, names in os.walk(root):
        top_level = parent == root
        dirs[:] = [d for d in dirs if not (top_level and skip(d))
                   and not os.path.islink(os.path.join(parent, d))]
        found += [os.path.relpath(os.path.join(parent, n), root) for n in names
                  if not (top_level and skip(n)) and not os.path.islink(os.path.join(parent, n))]
    return sorted(found)


def record(root: str, names: Iterable[str], durable: bool = False) -> Dict[str, dict]:
    """{name: {"size", "xxh3_64"}} for these files under root."""
    return {name: {"size": os.path.getsize(os.path.join(root, name)),
                   DIGEST: file_digest(os.path.join(root, name), durable)}
            for name in names}


def _resized(root: str, name: str, entry) -> Optional[str]:
    path = os.path.join(root, name)
    size = entry if isinstance(entry, int) else entry["size"]
    if not os.path.isfile(path):
        return f"{path} is missing"
    if os.path.getsize(path) != size:
        return f"{path} has {os.path.getsize(path)} bytes, {size} when saved"
    return None


def _changed(root: str, name: str, entry) -> Optional[str]:
    if isinstance(entry, int) or DIGEST not in entry:
        return None  # recorded before digests: its size was all there was
    path = os.path.join(root, name)
    found = file_digest(path)
    if found != entry[DIGEST]:
        return (f"{path} has other contents than when saved ({DIGEST} {found}, "
                f"{entry[DIGEST]} recorded)")
    return None


def size_problem(root: str, recorded: Dict[str, dict]) -> Optional[str]:
    """The first recorded file that is missing or of another size (a stat each), or None."""
    return next(filter(None, (_resized(root, n, e) for n, e in sorted(recorded.items()))), None)


def content_problem(root: str, recorded: Dict[str, dict],
                    names: Optional[Iterable[str]] = None) -> Optional[str]:
    """The first of `names` (default: every recorded file) whose contents differ from the
    recorded digest (each file read whole), or None."""
    names = sorted(recorded if names is None else names)
    return next(filter(None, (_changed(root, n, recorded[n]) for n in names)), None)


def digested(recorded: Dict[str, dict]) -> List[str]:
    """The recorded files that have a digest."""
    return [n for n, e in recorded.items() if not isinstance(e, int) and DIGEST in e]


def share(names: Iterable[str], rank: int, world: int) -> List[str]:
    """This rank's part of a verification: every world-th name of the sorted list, so each
    file is read by one rank (the whole checkpoint once, not once per rank)."""
    return sorted(names)[rank::world]


def total_bytes(recorded: Dict[str, dict], names: Optional[Iterable[str]] = None) -> int:
    entries = [recorded[n] for n in (recorded if names is None else names)]
    return sum(e if isinstance(e, int) else e["size"] for e in entries)


def size_text(n: float) -> str:
    """A size for messages: 5.0 MB, 1.2 GB."""
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _assign(views: List[List[str]]) -> List[List[str]]:
    """Each file name to one of the ranks that listed it, in turn: on a shared filesystem
    every rank lists every file, on node-local disks each node its own ranks' files."""
    seen_by: Dict[str, List[int]] = {}
    for rank, names in enumerate(views):
        for name in names:
            seen_by.setdefault(name, []).append(rank)
    shares: List[List[str]] = [[] for _ in views]
    for i, name in enumerate(sorted(seen_by)):
        ranks = seen_by[name]
        shares[ranks[i % len(ranks)]].append(name)
    return shares


def record_collectively(root: str, skip: Callable[[str], bool],
                        known: Optional[Dict[str, dict]] = None
                        ) -> Tuple[Dict[str, dict], bool, float]:
    """Collective, once every rank has written its files under root: each rank fsyncs and
    digests its share of them (reading them back once, from the page cache as a rule).
    `known`: this rank's files that are durable and digested already (a background writer
    digests the bytes as it writes them, checkpoint/async_save.py); they are not read again.
    -> (the whole record, on every rank; whether every rank listed the same files, i.e. root
    is on a filesystem they share; this rank's seconds)."""
    views: List[Optional[Tuple[List[str], Dict[str, dict]]]] = [None] * dist.get_world_size()
    dist.all_gather_object(views, (list_files(root, skip), known or {}))
    digested_by_writers = {name: entry for _, written in views for name, entry in written.items()}
    start = time.monotonic()
    unread = [[n for n in names if n not in digested_by_writers] for names, _ in views]
    mine = record(root, _assign(unread)[dist.get_rank()], durable=True)
    fsync_dir(root)
    seconds = time.monotonic() - start
    parts: List[Optional[dict]] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    shared = all(names == views[0][0] for names, _ in views)
    whole = {**digested_by_writers, **{n: e for part in parts for n, e in part.items()}}
    return dict(sorted(whole.items())), shared, seconds
