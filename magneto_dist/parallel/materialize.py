"""Shard-only construction: memory for this rank's shard and nothing more.

The model is built on the meta device (model_skeleton: names and shapes, no memory), tensor
parallelism swaps its modules for meta-device TP modules, and the pipeline keeps only this
stage's layers. Then every remaining meta parameter is given real memory of its local shape and
filled with its slice of the full parameter, which `weights(name)` makes one parameter at a time
(the name-keyed init, an export's tensor, or a full model's own). So a rank's peak is its shard
plus the largest single full parameter, not the full model (4 bytes per parameter per rank
before sharding: 27 GB per rank for a 6.7B model, times 8 ranks per node). Megatron does the same with its CPU master
weight (use_cpu_initialization); DeepSpeed's zero.Init partitions construction only under
ZeRO-3 and knows nothing of TP slices.

How a parameter is sliced is the TP plan's (tp_plan.SHARD_DIM), read from its name; the slice
position comes from the local shape, so a vocabulary padded for TP gets zero rows past the
real vocabulary with no padded full copy.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import nn

from ..compat.torch_modules import own_parameters, replace_own_parameter
from . import state
from .tp_plan import SHARD_DIM, tp_kind

FullWeights = Callable[[str], torch.Tensor]  # parameter name -> its full tensor (any device)


def is_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def copy_shard(local: torch.Tensor, full: torch.Tensor, dim, rank: int, name: str) -> None:
    """local <- rank's slice of `full` along `dim` (None: the whole tensor); slice positions
    past the end of `full` (vocabulary padding) are zero."""
    expected = list(full.shape)
    if dim is not None:
        expected[dim] = local.shape[dim]
    if list(local.shape) != expected:
        raise ValueError(f"parameter {name!r}: the full tensor is {list(full.shape)}, which "
                         f"does not slice to this rank's {list(local.shape)}")
    if dim is None:
        local.copy_(full)
        return
    width = local.shape[dim]
    start = rank * width
    kept = max(0, min(width, full.shape[dim] - start))
    if kept < width:
        local.zero_()
    if kept:
        local.narrow(dim, 0, kept).copy_(full.narrow(dim, start, kept))


def materialize(module: nn.Module, prefix: str, weights: Optional[FullWeights],
                device: torch.device) -> None:
    """Give every meta parameter under `module` (named `prefix` + its name in `module`) real
    memory on `device`, holding this rank's shard (`weights` is asked only for those, so a
    module with none needs no weights). A parameter shared by two modules (a tied head) stays
    shared; TP marks set on the meta parameter are kept."""
    tp, rank = state.tp_size(), state.tp_rank()
    made: Dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for module_name, sub in module.named_modules():
            for local_name, param in own_parameters(sub):
                if param is None or not param.is_meta:
                    continue
                if id(param) not in made:
                    name = ".".join(n for n in (prefix.rstrip("."), module_name, local_name) if n)
                    dim = SHARD_DIM[tp_kind(name)] if tp > 1 else None
                    shard = torch.empty(param.shape, dtype=param.dtype, device=device)
                    copy_shard(shard, weights(name), dim, rank, name)
                    new = nn.Parameter(shard, requires_grad=param.requires_grad)
                    new.__dict__.update(param.__dict__)  # tensor_model_parallel, partition_dim
                    made[id(param)] = new
                replace_own_parameter(sub, local_name, made[id(param)])
    left = [n for n, b in module.named_buffers() if b.is_meta]
    if left:
        raise ValueError(f"buffers {left} are still on the meta device: a module built under "
                         "model_skeleton must make its buffers on the CPU")


def own_weights(model: nn.Module) -> FullWeights:
    """A full model's own parameters as the source of its shards (tests, small models)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return lambda name: params[name].detach()
