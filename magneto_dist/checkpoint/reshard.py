"""Resume a checkpoint on another parallel layout, through DeepSpeed's universal checkpoint.

DeepSpeed loads its per-rank files only into the layout that wrote them. Its universal form (one
directory per parameter holding the full fp32 weight and both Adam moments, written by
`deepspeed.checkpoint.ds_to_universal` from the TP plan's patterns in the client state) loads
into any TP x PP x DP layout under ZeRO-1/2, and carries the step, the LR schedule and our client
state (data position) in its copied model-state files. What it cannot do is refused here, before
any process group forms, naming the route that works (see `refusal`).

The universal form of a tag is built once, inside the tag (`TAG/universal`), so it is pruned
with it and a re-save of the tag removes it: under a temp name, renamed when complete. Its
`built.json` records the source tag's identity and every file (size and content digest) and
link it holds; it is verified before reuse and rebuilt when anything differs (DeepSpeed loads
whichever parameter files exist: a deleted one silently left that weight at its fresh init).
One converter per filesystem: local rank 0 of each node wants it, the first takes
`TAG/universal.lock` (files.ProgressLock) and the others watch its progress, taking over a
converter that died or stalled; the other local ranks wait for the result.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from typing import Optional

from ..dims import layout_settings, world_of
from ..files import ProgressLock, atomic_write, pid_alive
from ..resilience.faults import NO_FAULTS, Faults
from . import integrity
from .tags import COMPLETE, TAG, UNIVERSAL, CheckpointDir, CheckpointError, Tag, saved_config

_PROCESS_START = time.time()  # a failure marker older than this is a previous attempt's
BUILT = "built.json"  # written into the universal form's temp directory last, before the rename
POLL_S = 1.0          # how often a waiter looks at the lock and the result


class ReshardError(CheckpointError):
    pass


def refusal(before: dict, now: dict) -> Optional[str]:
    """Why `before` cannot be resumed as `now` (or None). Measured with DeepSpeed 0.19.8:
    - ZeRO-0 keeps the optimizer state as one torch state dict per model-parallel rank, which
      ds_to_universal cannot read; loading a universal form without ZeRO fails in DeepSpeed
      (AttributeError: 'NoneType' object has no attribute 'copy');
    - ZeRO-3's universal loader does not re-slice megatron TP shards: into TP2 it failed with
      "start (81920) + length (16384) exceeds dimension size"."""
    same_size = f"resume on {world_of(before)} rank(s) with {layout_settings(before)}"
    if before["zero_stage"] == 0 or now["zero_stage"] == 0:
        return (f"a layout change needs ZeRO's partitioned optimizer state on both sides "
                f"(train.zero_stage 1, 2 or 3), not ZeRO-0; {same_size}, or export the weights "
                "with tools/convert_checkpoint.py --to safetensors and start from them "
                "(checkpoint.init_from)")
    if now["zero_stage"] == 3 and now["tp"] > 1:
        return (f"DeepSpeed's ZeRO-3 loader cannot re-slice tensor-parallel parameters; resume "
                f"with train.zero_stage=1 (or 2) at TP{now['tp']}, or with ZeRO-3 at TP1, or "
                f"{same_size}")
    return None


def _step_of(tag_dir: str) -> int:
    match = TAG.match(os.path.basename(tag_dir.rstrip("/")))
    return int(match.group(1)) if match else -1


def source_identity(tag_dir: str) -> dict:
    """What a universal form was built from: the tag's name and its marker's digest (which
    covers every file's digest and the save's time), so a re-saved or replaced tag differs."""
    marker = os.path.join(tag_dir, COMPLETE)
    return {"tag": os.path.basename(tag_dir.rstrip("/")),
            "marker": integrity.file_digest(marker) if os.path.isfile(marker) else None}


def _links(root: str) -> dict:
    """{relative path: target} of every symbolic link under root (the aliases)."""
    return {os.path.relpath(os.path.join(parent, n), root): os.readlink(os.path.join(parent, n))
            for parent, dirs, names in os.walk(root) for n in dirs + names
            if os.path.islink(os.path.join(parent, n))}


def _not_recorded(name: str) -> bool:
    return name == BUILT


def write_built(universal_dir: str, tag_dir: str, seconds: float) -> None:
    """built.json, last: the source's identity and every file (fsynced, with its size and
    digest) and link of the universal form, for universal_problem to check before reuse."""
    files = integrity.record(universal_dir, integrity.list_files(universal_dir, _not_recorded),
                             durable=True)
    atomic_write(os.path.join(universal_dir, BUILT), json.dumps(
        {"seconds": round(seconds, 2), "source": source_identity(tag_dir),
         "digest": integrity.DIGEST, "files": files, "links": _links(universal_dir)}) + "\n")


def universal_problem(final: str, source: dict) -> Optional[str]:
    """Why the universal form in `final` cannot be used for `source`, or None: not built, built
    from another tag or by an older version (no file record), or a file missing, resized,
    changed or added, or a link changed since it was built. Reads every file."""
    try:
        with open(os.path.join(final, BUILT), encoding="utf-8") as f:
            built = json.load(f)
    except FileNotFoundError:
        return "not built"
    except (OSError, ValueError) as err:
        return f"unreadable {BUILT} ({err})"
    if "files" not in built:
        return "built without a record of its files (an older version)"
    if built.get("source") != source:
        return f"built from {built.get('source')}, not from {source}"
    problem = (integrity.size_problem(final, built["files"])
               or integrity.content_problem(final, built["files"]))
    if problem:
        return problem
    extra = sorted(set(integrity.list_files(final, _not_recorded)) - set(built["files"]))
    if extra:
        return f"{os.path.join(final, extra[0])} was not part of it when built"
    if _links(final) != built.get("links", {}):
        return "its links (parameter aliases) changed since it was built"
    return None


def _rewrite_for_any_layout(universal_dir: str, tag_dir: str) -> None:
    """What ds_to_universal's output needs before any layout and ZeRO stage loads it."""
    from ..compat import ds_universal  # deferred: DeepSpeed's import costs seconds
    from ..model import model_skeleton
    from ..parallel.pipe_names import pipe_prefixes

    saved = saved_config(tag_dir)
    model = model_skeleton(saved.model)
    if saved.train.zero_stage == 3:
        ds_universal.shape_tensors(universal_dir, {n: p.shape
                                                   for n, p in model.named_parameters()})
    ds_universal.alias_parameters(universal_dir, pipe_prefixes(model))
    ds_universal.alias_model_states(universal_dir)
    ds_universal.bridge_optimizer_state(universal_dir)


def _bytes_under(root: str) -> int:
    total = 0
    for parent, _, names in os.walk(root):
        for name in names:
            try:
                total += os.lstat(os.path.join(parent, name)).st_size
            except FileNotFoundError:  # ds_to_universal removes its own temp files
                pass
    return total


def _temp_of(final: str, host: str, pid: int) -> str:
    """Where the converter with this host and pid writes before the rename."""
    return f"{final}.tmp-{host}-{pid}"


def _remove_temps(final: str, host: str, pid: int) -> None:
    """A converter's temp directory and its view of the source (compat.ds_universal)."""
    for path in (_temp_of(final, host, pid), f"{_temp_of(final, host, pid)}.source"):
        shutil.rmtree(path, ignore_errors=True)


def _remove_dead_temps(final: str) -> None:
    """What conversions killed on this host (their pid is gone) left."""
    prefix = f"{os.path.basename(final)}.tmp-{socket.gethostname()}-"
    parent = os.path.dirname(final)
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        pid = name[len(prefix):].split(".")[0] if name.startswith(prefix) else ""
        if pid.isdigit() and not pid_alive(int(pid)):
            _remove_temps(final, socket.gethostname(), int(pid))


def _convert(tag_dir: str, final: str, lock: ProgressLock, log, quiet: bool, faults: Faults,
             rank: int) -> None:
    """Holding the lock: verify the source, convert into a temp directory, record it, and put
    it in place of whatever `final` held."""
    from ..compat import ds_universal  # deferred: DeepSpeed's import costs seconds
    problem = Tag.at(tag_dir).damage(share=(0, 1), log=log)
    if problem:
        raise ReshardError(f"cannot convert {tag_dir} to the universal form: {problem}")
    temp = _temp_of(final, socket.gethostname(), os.getpid())
    lock.start_heartbeat(lambda: _bytes_under(temp))
    start = time.monotonic()
    log(f"converting {tag_dir} to the universal form (once; DeepSpeed's ds_to_universal) ...")
    try:
        ds_universal.convert(tag_dir, temp, quiet)
        faults.inject("kill_in_convert", rank, _step_of(tag_dir))
        _rewrite_for_any_layout(temp, tag_dir)
        write_built(temp, tag_dir, time.monotonic() - start)
        if os.path.lexists(final):  # damaged, stale or another tag's: replaced
            aside = f"{final}.old-{socket.gethostname()}-{os.getpid()}"
            os.rename(final, aside)
            shutil.rmtree(aside, ignore_errors=True)
        os.rename(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    log(f"universal form written to {final} in {time.monotonic() - start:.1f} s")


def build_universal(tag_dir: str, log=print, final: Optional[str] = None,
                    quiet: bool = True, faults: Faults = NO_FAULTS, rank: int = 0) -> str:
    """The universal form of a tag, in `final` (default TAG/universal): reused when it verifies
    against the tag, else converted by this process or, if another holds the lock, by that one
    (watched, and taken over if it dies or stalls). -> its path."""
    final = final or os.path.join(tag_dir, UNIVERSAL)
    os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)  # the lock goes beside it
    source = source_identity(tag_dir)
    lock = ProgressLock(f"{final}.lock")
    start = time.monotonic()
    problem = universal_problem(final, source)
    while problem:
        if problem != "not built":
            log(f"the universal form in {final} cannot be reused: {problem}; converting again")
        stale = lock.stale_holder()
        if lock.acquire() or (stale and _taken_over(lock, stale, log)):
            try:
                problem = universal_problem(final, source)  # another finished in between?
                if problem:
                    _remove_dead_temps(final)
                    _convert(tag_dir, final, lock, log, quiet, faults, rank)
            finally:
                lock.release()
            return final
        problem = _wait_for_holder(final, source, lock, log)
        start = time.monotonic()
    log(f"reusing the universal form in {final} (its files verified in "
        f"{time.monotonic() - start:.2f} s)")
    return final


def _taken_over(lock: ProgressLock, why: str, log) -> bool:
    """Take the lock from a stale converter and remove what it wrote (it is dead, or hung for
    STALL_S: if it ever wakes, its conversion fails, and the result of this one stands)."""
    holder = lock.holder() or {}
    if not lock.take_over():
        return False
    log(f"taking over the conversion: the converter on {why}")
    if holder.get("host") and holder.get("pid"):
        _remove_temps(lock.path[:-len(".lock")], holder["host"], holder["pid"])
    return True


def _wait_for_holder(final: str, source: dict, lock: ProgressLock, log) -> str:
    """While another process converts: until its result appears (-> its problem, None when
    usable) or it stops progressing (-> the caller takes over)."""
    holder = lock.holder() or {}
    log(f"waiting for the conversion by {holder.get('host')} pid {holder.get('pid')} "
        f"({lock.path}) ...")
    while True:
        time.sleep(POLL_S)
        if lock.stale_holder() or lock.holder() is None:
            return universal_problem(final, source)


def universal_source(tag: Tag, local_rank: int, log=print, faults: Faults = NO_FAULTS,
                     rank: int = 0) -> Tag:
    """The universal form of `tag`, as the engine loads it (load_universal). Every rank calls
    this before torch.distributed starts; local rank 0 builds (or verifies and reuses), and if
    that fails it says so in TAG/universal.failed, which ends the other ranks' wait (the
    builder's own error, a bug's traceback included, goes up unchanged)."""
    tag_dir = tag.path
    failed = os.path.join(tag_dir, f"{UNIVERSAL}.failed")
    if local_rank == 0:
        try:
            build_universal(tag_dir, log, faults=faults, rank=rank)
        except BaseException as err:
            atomic_write(failed, f"{type(err).__name__}: {err}\n")
            raise
    else:
        _wait_as_loader(os.path.join(tag_dir, UNIVERSAL), source_identity(tag_dir), failed)
    return CheckpointDir(tag_dir).tag(UNIVERSAL)


def _built_from(final: str, source: dict) -> bool:
    try:
        with open(os.path.join(final, BUILT), encoding="utf-8") as f:
            return json.load(f).get("source") == source
    except (OSError, ValueError):
        return False


def _wait_as_loader(final: str, source: dict, failed: str) -> None:
    """A rank other than its node's local rank 0: until a universal form built from `source`
    is in place (local rank 0 verifies or rebuilds it before this rank loads it: the process
    group forms only once every rank has got here). Gives up when local rank 0 reports a
    failure, or when neither the result nor any converter's progress shows for STALL_S."""
    lock = ProgressLock(f"{final}.lock")
    while not _built_from(final, source):
        if os.path.exists(failed) and os.path.getmtime(failed) >= _PROCESS_START:
            with open(failed, encoding="utf-8") as f:
                raise ReshardError(f"local rank 0 failed to build the universal form {final}: "
                                   f"{f.read().strip()}")
        stale = lock.stale_holder()  # a stale converter is taken over by a local rank 0
        if lock.quiet_s() > lock.stall_s:
            raise ReshardError(f"waited {lock.quiet_s():.0f} s for the universal form {final} "
                               f"without progress ({stale or 'no converter'}); see local rank "
                               "0's log on this node")
        time.sleep(POLL_S)
