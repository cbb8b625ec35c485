"""A run's layout, validated once from the config and the world size and passed down: the
data-parallel size, the gradient accumulation and what a checkpoint records as its layout are
read from here and computed nowhere else (torchtitan's ParallelDims). Every product of the
model-parallel sizes, every world size and data-parallel size, and every reading of the
layout's config keys is a function here, so that a new dimension is added in this file alone.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional

from .errors import ConfigError

# The model-parallel dimensions in megatron's rank order (tp fastest, then cp, then pp), the
# config key of each and its word in messages: one model replica spans the product of their
# sizes, and the world is that product times the data-parallel size.
MODEL_PARALLEL_KEYS = {"tp": "parallel.tensor_model_parallel_size",
                       "cp": "parallel.context_parallel_size",
                       "pp": "parallel.pipeline_model_parallel_size"}
_WORDS = {"tp": "tensor", "cp": "context", "pp": "pipeline"}
# Dimensions named in layouts and messages only when used (size > 1), so that a layout without
# them is recorded and described as it was before they existed, and such checkpoints compare equal.
OPTIONAL_DIMS = ("cp",)


def model_parallel_sizes(cfg) -> Dict[str, int]:
    """{"tp": ..., "cp": ..., "pp": ...} as a run config (config.Config) sets them."""
    return {dim: getattr(cfg.parallel, key.split(".", 1)[1])
            for dim, key in MODEL_PARALLEL_KEYS.items()}


def _used(sizes: dict) -> tuple:
    """The dimensions a layout or a message names: all but the unused optional ones."""
    return tuple(d for d in MODEL_PARALLEL_KEYS
                 if d not in OPTIONAL_DIMS or sizes.get(d, 1) > 1)


def model_parallel_size(sizes: dict) -> int:
    """The ranks one model replica spans, from model_parallel_sizes or a layout."""
    return math.prod(sizes.get(dim, 1) for dim in MODEL_PARALLEL_KEYS)


def model_parallel_text(sizes: dict) -> str:
    """For messages: TP2 x PP1 (TP2 x CP2 x PP1 with context parallelism)."""
    return " x ".join(f"{dim.upper()}{sizes[dim]}" for dim in _used(sizes))


def data_parallel_size(sizes: dict, world: int) -> Optional[int]:
    """The data-parallel replicas `world` ranks hold, or None when world is no multiple of
    the model-parallel size."""
    replica = model_parallel_size(sizes)
    return None if world % replica else world // replica


def world_of(layout: dict) -> int:
    """The ranks a layout (as a checkpoint marker records it) ran on."""
    return model_parallel_size(layout) * layout["dp"]


def layout_settings(layout: dict) -> str:
    """The config overrides that run a layout's model-parallel sizes and ZeRO stage again."""
    return " ".join([f"{MODEL_PARALLEL_KEYS[dim]}={layout[dim]}" for dim in _used(layout)]
                    + [f"train.zero_stage={layout['zero_stage']}"])


class LayoutError(ConfigError):
    """A layout that cannot run; the message names the config keys (config.validate turns it
    into a ConfigError)."""


@dataclass(frozen=True)
class ParallelDims:
    tp: int          # tensor-parallel degree: parallel.tensor_model_parallel_size
    pp: int          # pipeline stages: parallel.pipeline_model_parallel_size
    dp: int          # data-parallel replicas: world / (tp x cp x pp)
    world: int       # ranks in the job
    grad_accum: int  # micro-batches per rank per optimizer step
    zero_stage: int  # DeepSpeed ZeRO stage: train.zero_stage (a checkpoint's files depend on it)
    cp: int = 1      # context-parallel degree: parallel.context_parallel_size (each rank of a
                     # CP group holds 1/cp of every sequence of the same samples)

    @classmethod
    def build(cls, world: int, tp: int, pp: int, micro_batch: int, global_batch: int,
              zero_stage: int, cp: int = 1) -> "ParallelDims":
        """Checked sizes; every refusal says which key to change and to what."""
        sizes = {"tp": tp, "cp": cp, "pp": pp}
        if min(sizes.values()) < 1:
            raise LayoutError(" and ".join(f"{MODEL_PARALLEL_KEYS[d]}={sizes[d]}"
                                           for d in MODEL_PARALLEL_KEYS) + " must be at least 1")
        dp = data_parallel_size(sizes, world)
        if dp is None:
            used = _used(sizes)
            raise LayoutError(f"world size {world} is not divisible by "
                              f"{' x '.join(_WORDS[d] for d in used)} parallel size "
                              f"{' x '.join(str(sizes[d]) for d in used)}; launch a multiple of "
                              f"{model_parallel_size(sizes)} ranks")
        if micro_batch < 1:
            raise LayoutError(f"train.micro_batch_size={micro_batch} must be >= 1")
        if global_batch % (micro_batch * dp) or global_batch < 1:
            raise LayoutError(f"train.global_batch_size={global_batch} is not divisible by "
                              f"train.micro_batch_size x data-parallel size = {micro_batch} x "
                              f"{dp}; use a multiple of {micro_batch * dp}")
        return cls(tp=tp, pp=pp, dp=dp, world=world,
                   grad_accum=global_batch // (micro_batch * dp), zero_stage=zero_stage, cp=cp)

    @classmethod
    def of(cls, cfg, world: int) -> "ParallelDims":
        """From a run config (config.Config) and the number of ranks."""
        t = cfg.train
        return cls.build(world, **model_parallel_sizes(cfg), micro_batch=t.micro_batch_size,
                         global_batch=t.global_batch_size, zero_stage=t.zero_stage)

    @property
    def pipelined(self) -> bool:
        return self.pp > 1

    @property
    def model_parallel(self) -> int:
        """The ranks one model replica spans."""
        return model_parallel_size(self.layout)

    @property
    def grad_replicas(self) -> int:
        """The ranks that hold the same parameters and average their gradients: DeepSpeed's
        data-parallel group (ZeRO partitions over it too) is DP x CP, since the CP ranks of a
        group see other tokens of the same samples; the data sampler splits over DP only."""
        return self.dp * self.cp

    @property
    def layout(self) -> dict:
        """What a checkpoint's files depend on, as its marker records it. ZeRO's partitions
        follow DP x CP, so CP is part of it when used."""
        recorded = (*_used(asdict(self)), "dp", "zero_stage")
        return {k: v for k, v in asdict(self).items() if k in recorded}

    def describe(self) -> str:
        return describe(self.layout)


def describe(layout: dict) -> str:
    """A layout as a checkpoint marker records it, for messages: TP2 x PP1 x DP2 (ZeRO-1);
    with context parallelism TP2 x CP2 x PP1 x DP1 (ZeRO-1)."""
    return f"{model_parallel_text(layout)} x DP{layout['dp']} (ZeRO-{layout['zero_stage']})"
