"""A run's layout, validated once from the config and the world size and passed down: the
data-parallel size, the gradient accumulation and what a checkpoint records as its layout are
read from here and computed nowhere else (torchtitan's ParallelDims)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import ConfigError


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
        if tp < 1 or pp < 1 or cp < 1:
            raise LayoutError(f"parallel.tensor_model_parallel_size={tp}, "
                              f"parallel.context_parallel_size={cp} and "
                              f"parallel.pipeline_model_parallel_size={pp} must be at least 1")
        model_ranks = tp * cp * pp
        if world % model_ranks:
            sizes = (f"tensor x context x pipeline parallel size {tp} x {cp} x {pp}" if cp > 1
                     else f"tensor x pipeline parallel size {tp} x {pp}")
            raise LayoutError(f"world size {world} is not divisible by {sizes}; launch a "
                              f"multiple of {model_ranks} ranks")
        dp = world // model_ranks
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
        p, t = cfg.parallel, cfg.train
        return cls.build(world, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                         t.micro_batch_size, t.global_batch_size, t.zero_stage,
                         p.context_parallel_size)

    @property
    def pipelined(self) -> bool:
        return self.pp > 1

    @property
    def grad_replicas(self) -> int:
        """The ranks that hold the same parameters and average their gradients: DeepSpeed's
        data-parallel group (ZeRO partitions over it too) is DP x CP, since the CP ranks of a
        group see other tokens of the same samples; the data sampler splits over DP only."""
        return self.dp * self.cp

    @property
    def layout(self) -> dict:
        """What a checkpoint's files depend on, as its marker records it. ZeRO's partitions
        follow DP x CP, so CP is part of it; it is named only when used, so a layout without
        CP is recorded as it was before CP existed (and such checkpoints compare equal)."""
        kept = ("tp", "pp", "dp", "zero_stage") + (("cp",) if self.cp > 1 else ())
        return {k: v for k, v in asdict(self).items() if k in kept}

    def describe(self) -> str:
        return describe(self.layout)


def world_of(layout: dict) -> int:
    """The ranks of a layout as a checkpoint marker records it."""
    return layout["tp"] * layout.get("cp", 1) * layout["pp"] * layout["dp"]


def describe(layout: dict) -> str:
    """A layout as a checkpoint marker records it, for messages: TP2 x PP1 x DP2 (ZeRO-1);
    CP is named when it is used: TP2 x CP2 x PP1 x DP1 (ZeRO-1)."""
    cp = f" x CP{layout['cp']}" if layout.get("cp", 1) > 1 else ""
    return (f"TP{layout['tp']}{cp} x PP{layout['pp']} x DP{layout['dp']} "
            f"(ZeRO-{layout['zero_stage']})")
