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

import argparse
import contextlib
import io
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from typing import Optional

from ..files import atomic_write, wait_for_file
from ..resilience.faults import maybe_inject
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


def _convert(tag_dir: str, out_dir: str, quiet: bool) -> None:
    """ds_to_universal, in this process (its workers=1 path runs inline); when quiet, its
    chatter is captured and shown only if it fails."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=tag_dir, output_folder=out_dir,
                              num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=False)
    chatter = io.StringIO()
    try:
        with contextlib.ExitStack() as stack:
            if quiet:
                stack.enter_context(contextlib.redirect_stdout(chatter))
                stack.enter_context(contextlib.redirect_stderr(chatter))
            ds_to_universal.main(args)
    except (Exception, SystemExit) as err:  # its failures are asserts and KeyErrors
        shutil.rmtree(out_dir, ignore_errors=True)
        raise ReshardError(f"converting {tag_dir} to the universal form failed "
                           f"({type(err).__name__}: {err}); DeepSpeed said:\n"
                           f"{chatter.getvalue()[-2000:]}") from err


def _link(directory: str, name: str, alias: str) -> None:
    if not os.path.lexists(os.path.join(directory, alias)):
        os.symlink(name, os.path.join(directory, alias))


def _alias_parameters(universal_dir: str, model) -> None:
    """DeepSpeed's universal loader finds each parameter under the loading module's name, and a
    PipelineModule names them otherwise than the model ("5.layer.fc1.weight" is
    "decoder.layers.3.fc1.weight"): link every parameter's directory under both names."""
    from ..parallel.pipe_names import pipe_prefixes

    prefixes = pipe_prefixes(model)
    zero = os.path.join(universal_dir, "zero")
    for name in sorted(os.listdir(zero)):
        for pipe, full in prefixes.items():
            for have, other in ((pipe, full), (full, pipe)):
                if name.startswith(have):
                    _link(zero, name, other + name[len(have):])


def _parameter_dirs(universal_dir: str) -> dict:
    """name -> directory, for each parameter's own directory (not the aliases)."""
    zero = os.path.join(universal_dir, "zero")
    return {n: os.path.join(zero, n) for n in sorted(os.listdir(zero))
            if os.path.isdir(os.path.join(zero, n)) and not os.path.islink(os.path.join(zero, n))}


def _shape_tensors(universal_dir: str, model) -> None:
    """From a ZeRO-3 checkpoint without TP, ds_to_universal saves each state as a bare flat
    tensor; the ZeRO-1/2 loader (and the exporter) read {"param": tensor of the full shape},
    which is what ZeRO-1/2 sources already have."""
    import torch
    from deepspeed.checkpoint.constants import PARAM

    shapes = {name: p.shape for name, p in model.named_parameters()}
    for name, param_dir in _parameter_dirs(universal_dir).items():
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            path = os.path.join(param_dir, f"{key}.pt")
            if name not in shapes or not os.path.isfile(path):  # e.g. a tied alias's lone fp32
                continue
            value = torch.load(path, weights_only=False)
            if torch.is_tensor(value):
                torch.save({PARAM: value.view(shapes[name])}, path)


def _alias_model_states(universal_dir: str) -> None:
    """The step, LR schedule and client state are read from the copied model-state files, which
    ZeRO-1/2 name mp_rank_XX_model_states.pt and ZeRO-3 zero_pp_rank_0_mp_rank_XX_...: link
    the ones the source wrote under the other stage's name."""
    for name in sorted(os.listdir(universal_dir)):
        z12 = re.fullmatch(r"mp_rank_(\d+)_model_states\.pt", name)
        z3 = re.fullmatch(r"zero_pp_rank_0_mp_rank_(\d+)_model_states\.pt", name)
        if z12:
            _link(universal_dir, name, f"zero_pp_rank_0_mp_rank_{z12.group(1)}_model_states.pt")
        elif z3:
            _link(universal_dir, name, f"mp_rank_{z3.group(1)}_model_states.pt")


def _bridge_optimizer_state(universal_dir: str) -> None:
    """ds_to_universal writes zero/optimizer_state.pt in the format of the source's ZeRO stage,
    and each stage's loader reads only its own: ZeRO-1/2 need ds_version and a step.pt in every
    parameter's directory, ZeRO-3 the base optimizer's state dict for the step and the groups.
    Write both, so either stage loads a checkpoint of the other; drop the rank-0 optimizer
    tensors the ZeRO-3 form also carries, which no loader reads."""
    import deepspeed
    import torch
    from deepspeed.checkpoint.constants import DS_VERSION, OPTIMIZER_STATE_DICT, PARAM_GROUPS

    zero = os.path.join(universal_dir, "zero")
    path = os.path.join(zero, "optimizer_state.pt")
    state = torch.load(path, weights_only=False)
    params = list(_parameter_dirs(universal_dir).values())
    if OPTIMIZER_STATE_DICT in state:  # written from ZeRO-3
        step = state[OPTIMIZER_STATE_DICT]["state"][0]["step"]
        for param_dir in params:
            torch.save(step, os.path.join(param_dir, "step.pt"))
    else:  # any parameter with optimizer state (a tied alias's directory holds only fp32)
        with_step = next(p for p in params if os.path.isfile(os.path.join(p, "step.pt")))
        step = torch.load(os.path.join(with_step, "step.pt"), weights_only=False)
    state[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}},
                                   "param_groups": state[PARAM_GROUPS]}
    state.pop("fp32_flat_groups", None)
    state.setdefault(DS_VERSION, deepspeed.__version__)
    torch.save(state, path)


def _remove_dead_temps(final: str) -> None:
    """Temp directories of conversions killed on this host (their pid is gone)."""
    prefix = f"{os.path.basename(final)}.tmp-{socket.gethostname()}-"
    parent = os.path.dirname(final)
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            try:
                os.kill(int(name[len(prefix):]), 0)
            except ProcessLookupError:
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            except PermissionError:  # alive, someone else's
                pass


def _step_of(tag_dir: str) -> int:
    match = TAG.match(os.path.basename(tag_dir.rstrip("/")))
    return int(match.group(1)) if match else -1


def build_universal(tag_dir: str, log=print, final: Optional[str] = None,
                    quiet: bool = True) -> str:
    """The universal form of a tag, in `final` (default TAG/universal), converted now unless
    already there. -> its path."""
    final = final or os.path.join(tag_dir, UNIVERSAL)
    if os.path.isfile(os.path.join(final, BUILT)):
        log(f"reusing the universal form in {final}")
        return final
    _remove_dead_temps(final)
    temp = f"{final}.tmp-{socket.gethostname()}-{os.getpid()}"
    start = time.monotonic()
    log(f"converting {tag_dir} to the universal form (once; DeepSpeed's ds_to_universal) ...")
    _convert(tag_dir, temp, quiet)
    try:
        maybe_inject("kill_in_convert", int(os.environ.get("RANK", 0)), _step_of(tag_dir))
        saved = saved_config(tag_dir)
        from ..model import model_skeleton  # deferred: torch is not needed to find a tag
        model = model_skeleton(saved.model)
        if saved.train.zero_stage == 3:
            _shape_tensors(temp, model)
        _alias_parameters(temp, model)
        _alias_model_states(temp)
        _bridge_optimizer_state(temp)
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


def universal_source(ckpt_dir: str, tag: str, local_rank: int, log=print) -> ResumeSource:
    """Every rank calls this before torch.distributed starts; local rank 0 builds, and if that
    fails it says so in TAG/universal.failed, which ends the other ranks' wait."""
    tag_dir = os.path.join(ckpt_dir, tag)
    failed = os.path.join(tag_dir, f"{UNIVERSAL}.failed")
    if local_rank == 0:
        try:
            build_universal(tag_dir, log)
        except Exception as err:
            atomic_write(failed, f"{type(err).__name__}: {err}\n")
            raise ReshardError(f"converting {tag_dir} to the universal form failed: "
                               f"{type(err).__name__}: {err}") from err
    else:
        try:
            wait_for_file(os.path.join(tag_dir, UNIVERSAL, BUILT), f"the universal form of {tag}",
                          failure=failed, not_before=_PROCESS_START)
        except RuntimeError as err:
            raise ReshardError(str(err)) from err
    return ResumeSource(tag=tag, load_dir=tag_dir, load_tag=UNIVERSAL, universal=True)
