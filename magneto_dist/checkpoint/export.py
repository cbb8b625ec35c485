"""Consolidated weights: the full, layout-free parameters of a checkpoint of any layout, exported
as safetensors (with the model config as JSON) and read back into a model
(`checkpoint.init_from`, tools/generate.py).

An export records each tensor's content digest (integrity.py's XXH3-64 of its bytes, taken as
they are written) in config.json; a run starting from it checks every tensor it reads against
its digest and refuses one holding NaN or inf, by name.

The parameters come from the checkpoint's universal form (reshard.py: full fp32 master weights
by the model's own names, whatever TP x PP x DP x ZeRO wrote them), one at a time, so memory
holds one full parameter, not the model. A ZeRO-0 checkpoint has no universal form; its TP1 x PP1
module state is read directly.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from ..config import Config, config_to_dict
from ..files import atomic_write
from ..model import model_skeleton
from . import integrity
from .manager import UNIVERSAL, CheckpointError, model_differences, saved_config
from .reshard import build_universal, source_identity, universal_problem

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16"}


def model_shapes(model_cfg) -> Dict[str, torch.Size]:
    """Every parameter's name and shape, from a model built on the meta device (no memory);
    a tied alias (lm_head.weight is embed.word.weight) appears once, under its owner's name."""
    return {name: p.shape for name, p in model_skeleton(model_cfg).named_parameters()}


def full_parameters(tag_dir: str, work_dir: str, log=print) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, full fp32 tensor) for every model parameter, one at a time. A universal form is
    built under work_dir unless the tag has one."""
    cfg = saved_config(tag_dir)
    shapes = model_shapes(cfg.model)
    if cfg.train.zero_stage == 0:
        yield from _zero0_parameters(tag_dir, cfg, shapes)
        return
    universal = os.path.join(tag_dir, UNIVERSAL)
    if universal_problem(universal, source_identity(tag_dir)):  # the input is only read
        universal = build_universal(tag_dir, log, final=os.path.join(work_dir, UNIVERSAL))
    for name, shape in shapes.items():
        path = os.path.join(universal, "zero", name, "fp32.pt")
        if not os.path.isfile(path):
            raise CheckpointError(f"{tag_dir}: the universal form has no parameter {name!r} "
                                  f"({path}); was the checkpoint written by another model?")
        yield name, _checked(name, torch.load(path, weights_only=False)["param"], shape, tag_dir)


def _zero0_parameters(tag_dir: str, cfg: Config, shapes) -> Iterator[Tuple[str, torch.Tensor]]:
    par = cfg.parallel
    if par.tensor_model_parallel_size > 1 or par.pipeline_model_parallel_size > 1:
        raise CheckpointError(
            f"{tag_dir} was written without ZeRO (train.zero_stage=0) by TP"
            f"{par.tensor_model_parallel_size} x PP{par.pipeline_model_parallel_size}: it has no "
            "universal form to consolidate from; resume it on its own layout with "
            "train.exit_at_step and train.zero_stage=1, save, and convert that checkpoint")
    module = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), mmap=True,
                        map_location="cpu", weights_only=False)["module"]
    for name, shape in shapes.items():
        yield name, _checked(name, module[name].float(), shape, tag_dir)


def _checked(name: str, tensor: torch.Tensor, shape, source: str) -> torch.Tensor:
    if tensor.shape != shape:
        raise CheckpointError(f"{source}: parameter {name!r} has shape {list(tensor.shape)}, "
                              f"the model config needs {list(shape)}")
    return tensor


def _tensor_digest(tensor: torch.Tensor) -> str:
    """The digest of a tensor's bytes as stored (its dtype, row-major)."""
    return integrity.buffer_digest(tensor.contiguous().view(torch.uint8).numpy())


def write_safetensors(path: str, shapes: Dict[str, torch.Size], dtype: torch.dtype,
                      tensors: Iterator[Tuple[str, torch.Tensor]], metadata: Dict[str, str],
                      progress: Callable = lambda it, total: it) -> Dict[str, str]:
    """Stream tensors into one safetensors file, in `shapes` order; -> each tensor's digest.
    safetensors' own save_file needs every tensor in memory at once; its format is simple and
    documented (8-byte little-endian header size, a JSON header of dtypes, shapes and byte
    offsets, then the raw bytes), so with the shapes known up front each tensor is written as
    it arrives."""
    header, offset = {"__metadata__": metadata}, 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for name, shape in shapes.items():
        size = int(torch.Size(shape).numel()) * itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    digests = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for (name, tensor), expected in progress(zip(tensors, shapes), len(shapes)):
            assert name == expected, (name, expected)  # full_parameters yields in shapes order
            stored = tensor.to(dtype).contiguous()
            digests[name] = _tensor_digest(stored)
            f.write(stored.view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    return digests


def export_safetensors(tag_dir: str, out_dir: str, dtype: str = "fp32", log=print,
                       progress: Callable = lambda it, total: it) -> str:
    """tag -> out_dir/{model.safetensors, config.json}, written under a temp name and renamed."""
    if os.path.exists(out_dir):
        raise CheckpointError(f"--output {out_dir} already exists; choose a new directory")
    cfg = saved_config(tag_dir)
    temp = f"{out_dir.rstrip('/')}.tmp{os.getpid()}"
    os.makedirs(temp)
    try:
        shapes = model_shapes(cfg.model)
        digests = write_safetensors(os.path.join(temp, WEIGHTS), shapes, DTYPES[dtype],
                                    full_parameters(tag_dir, temp, log),
                                    {"format": "pt", "source": os.path.abspath(tag_dir)},
                                    progress)
        shutil.rmtree(os.path.join(temp, UNIVERSAL), ignore_errors=True)
        atomic_write(os.path.join(temp, CONFIG), json.dumps(
            {"model": config_to_dict(cfg)["model"], "dtype": dtype,
             "source": os.path.abspath(tag_dir), "digest": integrity.DIGEST,
             "digests": digests}, indent=1) + "\n")
        os.rename(temp, out_dir)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return out_dir


def check_consolidated(init_dir: str, cfg: Config) -> None:
    """Refuse, before anything starts, an export that does not fit the configured model."""
    from safetensors import SafetensorError, safe_open

    config_path, weights = os.path.join(init_dir, CONFIG), os.path.join(init_dir, WEIGHTS)
    if not (os.path.isfile(config_path) and os.path.isfile(weights)):
        raise CheckpointError(f"checkpoint.init_from={init_dir}: not a consolidated export (needs "
                              f"{CONFIG} and {WEIGHTS}; tools/convert_checkpoint.py --to "
                              "safetensors writes them)")
    with open(config_path, encoding="utf-8") as f:
        diffs = model_differences(json.load(f).get("model", {}), cfg)
    if diffs:
        raise CheckpointError(f"checkpoint.init_from={init_dir} holds another model: "
                              f"{'; '.join(diffs)}")
    shapes = model_shapes(cfg.model)
    try:
        with safe_open(weights, framework="pt") as f:
            found = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({err})") from err
    for name, shape in shapes.items():
        if found.get(name) != list(shape):
            raise CheckpointError(
                f"{weights}: parameter {name!r} is {found.get(name, 'missing')}, the model "
                f"config needs {list(shape)}")
    extra = sorted(set(found) - set(shapes))
    if extra:
        raise CheckpointError(f"{weights}: parameters the model does not have: {extra[:5]}")


def checked_tensor(path: str, name: str, tensor: torch.Tensor, digest: Optional[str]
                   ) -> torch.Tensor:
    """An export's tensor as read, refused if its bytes differ from the recorded digest or it
    holds NaN or inf (training from it would be NaN from the first step)."""
    if digest is not None and _tensor_digest(tensor) != digest:
        raise CheckpointError(f"{path}: parameter {name!r} has other contents than when "
                              f"exported ({integrity.DIGEST} {_tensor_digest(tensor)}, {digest} "
                              "recorded); export the checkpoint again")
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise CheckpointError(f"{path}: parameter {name!r} has {bad} NaN or inf value(s) of "
                              f"{tensor.numel()}; start from an export of a checkpoint "
                              "written before the run diverged")
    return tensor


def consolidated_weights(init_dir: str) -> Callable[[str], torch.Tensor]:
    """name -> an export's full tensor, read one at a time (safetensors reads only that
    tensor's bytes) and checked (checked_tensor), for parallelize() to slice: a rank never
    holds the whole export."""
    from safetensors import safe_open

    path = os.path.join(init_dir, WEIGHTS)
    with open(os.path.join(init_dir, CONFIG), encoding="utf-8") as f:
        digests = json.load(f).get("digests", {})  # exports older than digests have none

    def full(name: str) -> torch.Tensor:
        with safe_open(path, framework="pt") as f:
            return checked_tensor(path, name, f.get_tensor(name), digests.get(name))
    return full
