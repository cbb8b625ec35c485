"""Resume a checkpoint on another parallel layout, through DeepSpeed's universal checkpoint.

DeepSpeed loads its per-rank files only into the layout that wrote them. Its universal form (one
directory per parameter holding the full fp32 weight and both Adam moments, written by
`deepspeed.checkpoint.ds_to_universal` from the TP plan's patterns in the client state) loads
into any TP x PP x DP layout under ZeRO-1/2, and carries the step, the LR schedule and our client
state (data position) in its copied model-state files. What it cannot do is refused here, before
any process group forms, naming the route that works (see `refusal`).

The universal form of a tag is built once, inside the tag (`TAG/universal`), so it is pruned
with it and a re-save of the tag removes it: under a temp name, renamed when complete, reused
when present. Local rank 0 of each node builds it (two nodes on a shared filesystem race
harmlessly: the second rename finds the first one's result); the other ranks wait for it.
"""
from __future__ import annotations

import os
import shutil
import socket
import time
from dataclasses import dataclass
from typing import Optional

from ..files import atomic_write, pid_alive, wait_for_file
from ..resilience.faults import NO_FAULTS, Faults
from .manager import TAG, UNIVERSAL, CheckpointError, saved_config

_PROCESS_START = time.time()  # a failure marker older than this is a previous attempt's
BUILT = "built.json"  # written into the universal form's temp directory last, before the rename


class ReshardError(CheckpointError):
    pass


@dataclass
class ResumeSource:
    tag: str                 # the checkpoint resumed (global_stepN)
    load_dir: str            # engine.load_checkpoint reads (load_dir, load_tag)
    load_tag: str
    universal: bool = False  # the universal form: the engine needs load_universal


def refusal(before: dict, now: dict) -> Optional[str]:
    """Why `before` cannot be resumed as `now` (or None). Measured with DeepSpeed 0.19.8:
    - ZeRO-0 keeps the optimizer state as one torch state dict per model-parallel rank, which
      ds_to_universal cannot read; loading a universal form without ZeRO fails in DeepSpeed
      (AttributeError: 'NoneType' object has no attribute 'copy');
    - ZeRO-3's universal loader does not re-slice megatron TP shards: into TP2 it failed with
      "start (81920) + length (16384) exceeds dimension size"."""
    same_size = f"resume on {before['tp'] * before['pp'] * before['dp']} rank(s) with " \
                f"parallel.tensor_model_parallel_size={before['tp']} " \
                f"parallel.pipeline_model_parallel_size={before['pp']} " \
                f"train.zero_stage={before['zero_stage']}"
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


def _remove_dead_temps(final: str) -> None:
    """Temp directories of conversions killed on this host (their pid is gone)."""
    prefix = f"{os.path.basename(final)}.tmp-{socket.gethostname()}-"
    parent = os.path.dirname(final)
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        if (name.startswith(prefix) and name[len(prefix):].isdigit()
                and not pid_alive(int(name[len(prefix):]))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _step_of(tag_dir: str) -> int:
    match = TAG.match(os.path.basename(tag_dir.rstrip("/")))
    return int(match.group(1)) if match else -1


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


def build_universal(tag_dir: str, log=print, final: Optional[str] = None,
                    quiet: bool = True, faults: Faults = NO_FAULTS, rank: int = 0) -> str:
    """The universal form of a tag, in `final` (default TAG/universal), converted now unless
    already there. -> its path."""
    from ..compat import ds_universal  # deferred: DeepSpeed's import costs seconds
    final = final or os.path.join(tag_dir, UNIVERSAL)
    if os.path.isfile(os.path.join(final, BUILT)):
        log(f"reusing the universal form in {final}")
        return final
    _remove_dead_temps(final)
    temp = f"{final}.tmp-{socket.gethostname()}-{os.getpid()}"
    start = time.monotonic()
    log(f"converting {tag_dir} to the universal form (once; DeepSpeed's ds_to_universal) ...")
    ds_universal.convert(tag_dir, temp, quiet)
    try:
        faults.inject("kill_in_convert", rank, _step_of(tag_dir))
        _rewrite_for_any_layout(temp, tag_dir)
        atomic_write(os.path.join(temp, BUILT), f'{{"seconds": {time.monotonic() - start:.2f}}}\n')
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    try:
        os.rename(temp, final)
    except OSError:  # another node's rank built it first on a shared filesystem
        if not os.path.isfile(os.path.join(final, BUILT)):
            raise
        shutil.rmtree(temp, ignore_errors=True)
    log(f"universal form written to {final} in {time.monotonic() - start:.1f} s")
    return final


def universal_source(ckpt_dir: str, tag: str, local_rank: int, log=print,
                     faults: Faults = NO_FAULTS, rank: int = 0) -> ResumeSource:
    """Every rank calls this before torch.distributed starts; local rank 0 builds, and if that
    fails it says so in TAG/universal.failed, which ends the other ranks' wait (the builder's
    own error, a bug's traceback included, goes up unchanged)."""
    tag_dir = os.path.join(ckpt_dir, tag)
    failed = os.path.join(tag_dir, f"{UNIVERSAL}.failed")
    if local_rank == 0:
        try:
            build_universal(tag_dir, log, faults=faults, rank=rank)
        except BaseException as err:
            atomic_write(failed, f"{type(err).__name__}: {err}\n")
            raise
    else:
        try:
            wait_for_file(os.path.join(tag_dir, UNIVERSAL, BUILT), f"the universal form of {tag}",
                          failure=failed, not_before=_PROCESS_START)
        except (RuntimeError, TimeoutError) as err:  # the builder's failure, or no builder
            raise ReshardError(str(err)) from err
    return ResumeSource(tag=tag, load_dir=tag_dir, load_tag=UNIVERSAL, universal=True)
