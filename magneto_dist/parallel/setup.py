"""From a model to this rank's shard, in small explicit steps (torchtitan's order): process
groups -> tensor parallelism (and sequence parallelism) -> context parallelism ->
activation recompute -> compiled blocks -> pipeline stages -> memory for the shard.
The model is normally a meta-device skeleton (model_skeleton) and only this rank's shard is ever
materialized (materialize.py). The model itself holds no parallelism, and nothing here knows
about training: the DeepSpeed engine around the result is built in training/engine.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from megatron.core import parallel_state as ps
from torch import nn

from ..config import Config
from . import state
from ..dims import ParallelDims
from .compile import compile_blocks, transformer_blocks
from .context_parallel import apply_context_parallel, shard_batch
from .materialize import FullWeights, is_meta, materialize
from .pipeline import build_pipeline
from .random import (TensorParallelRNG, apply_activation_checkpointing, seed_streams,
                     use_tensor_parallel_rng)
from .tensor_parallel import apply_tensor_parallel


@dataclass
class Parallelized:
    module: nn.Module                    # this rank's shard; with PP > 1 its PipelineModule
    dims: ParallelDims                   # the layout it was made for
    dp_rank: int                         # this rank's share of the samples (DP, without CP)
    dp_group: object                     # the ranks a step's loss is averaged over, the ones
                                         # DeepSpeed averages gradients over: DP x CP
    mpu: Optional[object] = None         # the groups for DeepSpeed's engine without a pipeline
                                         # (a PipelineModule carries its own topology)
    tp_rng: Optional[TensorParallelRNG] = None  # the per-TP-rank dropout stream, when used:
                                         # saved and restored with each rank's RNG state
    compile_note: Optional[str] = None   # train.compile=blocks: what was compiled, or why not
    cp_rank: int = 0                     # this rank's place in its context-parallel group

    def local_batch(self, batch: dict) -> dict:
        """The part of a (DP rank's) batch this rank computes: its chunks of each sequence
        under context parallelism, the whole batch otherwise."""
        return shard_batch(batch, self.cp_rank, self.dims.cp) if self.dims.cp > 1 else batch


def local_device() -> torch.device:
    return (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
            else torch.device("cpu"))


def parallelize(model: nn.Module, cfg: Config, dims: ParallelDims,
                weights: Optional[FullWeights] = None,
                pipeline_loss: Optional[Callable] = None) -> Parallelized:
    """Shard `model` for this rank. A meta-device skeleton needs `weights` (name -> full
    tensor, e.g. model.InitWeights) and gets memory for this rank's shard only, on this rank's
    device; a full model is sliced from its own weights (apply_tensor_parallel), so it needs
    none. pipeline_loss(logits, (labels, loss_mask)) -> loss is the last stage's loss when
    PP > 1 (the PipelineModule computes it). The default random stream is seeded here, per
    pipeline stage (parallel/random.py seed_streams)."""
    if weights is None and is_meta(model):
        raise ValueError("parallelize: a meta-device model needs `weights` to fill its shard")
    p, (tp, pp, dp) = cfg.parallel, (dims.tp, dims.pp, dims.dp)
    state.initialize_groups(tp, pp, p.timeout_minutes, cp=dims.cp)
    if ps.get_data_parallel_world_size() != dp:
        raise ValueError(f"parallelize: the process groups have DP"
                         f"{ps.get_data_parallel_world_size()}, the layout {dims.describe()}")
    rng = seed_streams(cfg.train.seed, state.tp_rank(), ps.get_pipeline_model_parallel_rank())
    # attention dropout (and under SP every dropout) draws from the TP stream
    tp_stream = tp > 1 and cfg.model.dropout > 0
    if tp > 1:
        apply_tensor_parallel(model, p.vocab_padding_multiple, p.sequence_parallel)
        if tp_stream:
            use_tensor_parallel_rng(model, rng, p.sequence_parallel)
    if dims.cp > 1:
        apply_context_parallel(model, state.cp_group())
    if p.activation_checkpointing:
        apply_activation_checkpointing(transformer_blocks(model), rng if tp_stream else None)
    compiled = compile_blocks(model, cfg, dims) if cfg.train.compile == "blocks" else None
    common = dict(dims=dims, dp_rank=state.sampler_rank(), dp_group=state.grad_replica_group(),
                  tp_rng=rng if tp > 1 else None, compile_note=compiled,
                  cp_rank=state.cp_rank())
    if pp > 1:
        if pipeline_loss is None:
            raise ValueError("parallelize: PP > 1 needs pipeline_loss")
        return Parallelized(module=build_pipeline(model, tp, pp, dims.grad_replicas,
                                                  pipeline_loss,
                                                  p.pipeline_partition, weights, local_device(),
                                                  p.sequence_parallel),
                            **common)
    materialize(model, "", weights, local_device())
    return Parallelized(module=model, mpu=state.DeepSpeedMPU(), **common)
