"""DeepSpeed 0.19.8's universal checkpoint: the conversion, the repairs its output needs before
it loads across layouts and ZeRO stages, and the repair of its ZeRO-3 loader.

`ds_to_universal` is a script whose `main(args)` takes its argparse namespace, and its output
format (one directory per parameter under `zero/`, the copied model-state files, and
`zero/optimizer_state.pt`) is DeepSpeed's own. What it lacked, each found by a failing resume:
- a PipelineModule names parameters otherwise than the model ("5.layer.fc1.weight" is
  "decoder.layers.3.fc1.weight"), and the loader looks parameters up by the loading module's
  names: every parameter directory is linked under both (`alias_parameters`);
- from a ZeRO-3 source without TP each state is a bare flat tensor, where the ZeRO-1/2 loader
  (and our exporter) read {"param": tensor of the full shape} (`shape_tensors`);
- ZeRO-1/2 name the model-state files mp_rank_XX_model_states.pt and ZeRO-3
  zero_pp_rank_0_mp_rank_XX_...: each is linked under the other's name (`alias_model_states`);
- each stage's loader reads only its own format of zero/optimizer_state.pt: both are written
  (`bridge_optimizer_state`);
- after a ZeRO-3 universal load, every parameter group shares group 0's hyperparameters and one
  `step` tensor (`repair_zero3_universal_load`).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import sys
from typing import Dict, Sequence

import deepspeed
import torch
from deepspeed.checkpoint import ds_to_universal
from deepspeed.checkpoint import constants as ds_constants
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

from ..errors import CheckpointError
from . import require_attribute, require_parameters

LIBRARY = "deepspeed"
STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")  # a parameter directory's files, without .pt


def _arguments(tag_dir: str, out_dir: str) -> argparse.Namespace:
    return argparse.Namespace(input_folder=tag_dir, output_folder=out_dir,
                              num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=False)


def _own_files_view(tag_dir: str, view: str) -> None:
    """A directory of links to the tag's own files. ds_to_universal finds the model-state files
    by walking its input folder recursively (reshape_utils.get_files), so a universal form
    inside the tag (TAG/universal, being replaced because it was damaged, or a dead
    converter's temp directory) made it count twice the files and fail."""
    os.makedirs(view)
    for name in sorted(os.listdir(tag_dir)):
        if os.path.isfile(os.path.join(tag_dir, name)):
            os.symlink(os.path.abspath(os.path.join(tag_dir, name)), os.path.join(view, name))


def convert(tag_dir: str, out_dir: str, quiet: bool = True) -> None:
    """ds_to_universal, in this process (its workers=1 path runs inline), on the tag's own
    files; when quiet, its chatter is captured and shown only if it fails. Raises
    CheckpointError."""
    chatter = io.StringIO()
    view = f"{out_dir.rstrip('/')}.source"
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(shutil.rmtree, view, ignore_errors=True)
            _own_files_view(tag_dir, view)
            if quiet:
                stack.enter_context(contextlib.redirect_stdout(chatter))
                stack.enter_context(contextlib.redirect_stderr(chatter))
            ds_to_universal.main(_arguments(view, out_dir))
    # ds_to_universal reports a checkpoint it cannot convert with asserts, KeyErrors and
    # sys.exit; the message and DeepSpeed's own output go into the error, whole
    except (AssertionError, KeyError, ValueError, RuntimeError, OSError, SystemExit) as err:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise CheckpointError(f"converting {tag_dir} to the universal form failed "
                              f"({type(err).__name__}: {err}); DeepSpeed said:\n"
                              f"{chatter.getvalue()[-2000:]}") from err


def link(directory: str, name: str, alias: str) -> None:
    if not os.path.lexists(os.path.join(directory, alias)):
        os.symlink(name, os.path.join(directory, alias))


def parameter_dirs(universal_dir: str) -> Dict[str, str]:
    """name -> directory, for each parameter's own directory (not the aliases)."""
    zero = os.path.join(universal_dir, "zero")
    return {n: os.path.join(zero, n) for n in sorted(os.listdir(zero))
            if os.path.isdir(os.path.join(zero, n)) and not os.path.islink(os.path.join(zero, n))}


def alias_parameters(universal_dir: str, prefixes: Dict[str, str]) -> None:
    """Link each parameter's directory under its other name; `prefixes` maps a pipeline name
    prefix ("5.layer.") to the model's ("decoder.layers.3.")."""
    zero = os.path.join(universal_dir, "zero")
    for name in sorted(os.listdir(zero)):
        for pipe, full in prefixes.items():
            for have, other in ((pipe, full), (full, pipe)):
                if name.startswith(have):
                    link(zero, name, other + name[len(have):])


def shape_tensors(universal_dir: str, shapes: Dict[str, Sequence[int]]) -> None:
    """Bare flat tensors (a ZeRO-3 source without TP) -> {"param": tensor of the full shape}."""
    for name, param_dir in parameter_dirs(universal_dir).items():
        for key in STATE_KEYS:
            path = os.path.join(param_dir, f"{key}.pt")
            if name not in shapes or not os.path.isfile(path):  # e.g. a tied alias's lone fp32
                continue
            value = torch.load(path, weights_only=False)
            if torch.is_tensor(value):
                torch.save({ds_constants.PARAM: value.view(shapes[name])}, path)


def alias_model_states(universal_dir: str) -> None:
    """The step, LR schedule and client state are read from the copied model-state files, which
    ZeRO-1/2 and ZeRO-3 name differently: link the ones the source wrote under the other's."""
    for name in sorted(os.listdir(universal_dir)):
        z12 = re.fullmatch(r"mp_rank_(\d+)_model_states\.pt", name)
        z3 = re.fullmatch(r"zero_pp_rank_0_mp_rank_(\d+)_model_states\.pt", name)
        if z12:
            link(universal_dir, name, f"zero_pp_rank_0_mp_rank_{z12.group(1)}_model_states.pt")
        elif z3:
            link(universal_dir, name, f"mp_rank_{z3.group(1)}_model_states.pt")


def bridge_optimizer_state(universal_dir: str) -> None:
    """zero/optimizer_state.pt in both stages' formats: ZeRO-1/2 need ds_version and a step.pt
    in every parameter's directory, ZeRO-3 the base optimizer's state dict for the step and the
    groups. The rank-0 optimizer tensors the ZeRO-3 form also carries, which no loader reads,
    are dropped."""
    path = os.path.join(universal_dir, "zero", "optimizer_state.pt")
    state = torch.load(path, weights_only=False)
    params = list(parameter_dirs(universal_dir).values())
    if ds_constants.OPTIMIZER_STATE_DICT in state:  # written from ZeRO-3
        step = state[ds_constants.OPTIMIZER_STATE_DICT]["state"][0]["step"]
        for param_dir in params:
            torch.save(step, os.path.join(param_dir, "step.pt"))
    else:  # any parameter with optimizer state (a tied alias's directory holds only fp32)
        with_step = next(p for p in params if os.path.isfile(os.path.join(p, "step.pt")))
        step = torch.load(os.path.join(with_step, "step.pt"), weights_only=False)
    state[ds_constants.OPTIMIZER_STATE_DICT] = {
        "state": {0: {"step": step}}, "param_groups": state[ds_constants.PARAM_GROUPS]}
    state.pop("fp32_flat_groups", None)
    state.setdefault(ds_constants.DS_VERSION, deepspeed.__version__)
    torch.save(state, path)


def repair_zero3_universal_load(engine, groups: Sequence[dict]) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal loader (stage3.py,
    load_hp_checkpoint_state_from_checkpoint_dir_stage3), measured as a resumed run drifting
    from its second step on (4e-3 in loss by step 10):
    - it copies the first parameter group's hyperparameters into every group, giving biases
      and norm gains weight decay and every group the first one's LR (muP's hidden matrices
      too): each group's own name and weight decay (`groups`, in group order) are put back,
      and its LR from the schedule, whose state (per group) was loaded beside it;
    - it gives every group the same `step` tensor, which Adam increments in place once per
      group per step, so the second group's bias correction ran ahead: one tensor each."""
    inner = engine.optimizer.optimizer
    if len(inner.param_groups) != len(groups):
        raise RuntimeError(f"ZeRO-3 universal load: {len(inner.param_groups)} optimizer groups, "
                           f"expected {len(groups)}")
    lrs = engine.lr_scheduler.get_last_lr()
    for group, own, lr in zip(inner.param_groups, groups, lrs):
        group.update(name=own["name"], weight_decay=own["weight_decay"], lr=lr)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def check() -> None:
    """What this module relies on is still there (run at import)."""
    require_attribute(LIBRARY, ds_to_universal, "parse_arguments", "ds_to_universal's arguments")
    argv = sys.argv
    sys.argv = ["ds_to_universal", "--input_folder", "in", "--output_folder", "out"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its arguments
            expected = vars(ds_to_universal.parse_arguments())
    finally:
        sys.argv = argv
    if set(expected) != set(vars(_arguments("in", "out"))):
        from . import incompatible
        raise incompatible(LIBRARY, "ds_to_universal arguments",
                           f"are ({', '.join(sorted(expected))})")
    require_parameters(LIBRARY, ds_to_universal.main, ["args"], "ds_to_universal.main(args)")
    for name in ("PARAM", "OPTIMIZER_STATE_DICT", "PARAM_GROUPS", "DS_VERSION"):
        require_attribute(LIBRARY, ds_constants, name, f"checkpoint constant {name}")
    require_attribute(LIBRARY, DeepSpeedZeroOptimizer_Stage3,
                      "load_hp_checkpoint_state_from_checkpoint_dir_stage3")


check()
