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
    dp: int          # data-parallel replicas: world / (tp x pp)
    world: int       # ranks in the job
    grad_accum: int  # micro-batches per rank per optimizer step
    zero_stage: int  # DeepSpeed ZeRO stage: train.zero_stage (a checkpoint's files depend on it)

    @classmethod
    def build(cls, world: int, tp: int, pp: int, micro_batch: int, global_batch: int,
              zero_stage: int) -> "ParallelDims":
        """Checked sizes; every refusal says which key to change and to what."""
        if tp < 1 or pp < 1:
            raise LayoutError(f"parallel.tensor_model_parallel_size={tp} and "
                              f"parallel.pipeline_model_parallel_size={pp} must be at least 1")
        if world % (tp * pp):
            raise LayoutError(f"world size {world} is not divisible by tensor x pipeline "
                              f"parallel size {tp} x {pp}; launch a multiple of {tp * pp} ranks")
        dp = world // (tp * pp)
        if micro_batch < 1:
            raise LayoutError(f"train.micro_batch_size={micro_batch} must be >= 1")
        if global_batch % (micro_batch * dp) or global_batch < 1:
            raise LayoutError(f"train.global_batch_size={global_batch} is not divisible by "
                              f"train.micro_batch_size x data-parallel size = {micro_batch} x "
                              f"{dp}; use a multiple of {micro_batch * dp}")
        return cls(tp=tp, pp=pp, dp=dp, world=world,
                   grad_accum=global_batch // (micro_batch * dp), zero_stage=zero_stage)

    @classmethod
    def of(cls, cfg, world: int) -> "ParallelDims":
        """From a run config (config.Config) and the number of ranks."""
        p, t = cfg.parallel, cfg.train
        return cls.build(world, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                         t.micro_batch_size, t.global_batch_size, t.zero_stage)

    @property
    def pipelined(self) -> bool:
        return self.pp > 1

    @property
    def layout(self) -> dict:
        """What a checkpoint's files depend on, as its marker records it."""
        return {k: v for k, v in asdict(self).items() if k in ("tp", "pp", "dp", "zero_stage")}

    def describe(self) -> str:
        return describe(self.layout)


def describe(layout: dict) -> str:
    """A layout as a checkpoint marker records it, for messages: TP2 x PP1 x DP2 (ZeRO-1)."""
    return (f"TP{layout['tp']} x PP{layout['pp']} x DP{layout['dp']} "
            f"(ZeRO-{layout['zero_stage']})")
