"""From a full model to an engine, in small explicit steps (torchtitan's order):
process groups -> tensor parallelism -> activation recompute -> pipeline stages or the
data-parallel/ZeRO engine. The model itself holds no parallelism."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
from deepspeed.checkpoint import constants as ds_ckpt
from megatron.core import parallel_state as ps
from torch import nn

from ..config import Config
from ..training.engine import build_engine
from ..training.tasks import move_batch
from . import state
from .pipeline import build_pipeline
from .random import TensorParallelRNG, apply_activation_checkpointing, use_tensor_parallel_rng
from .tensor_parallel import FullLogits, apply_tensor_parallel, vocab_parallel_cross_entropy
from .tp_plan import REPLICATED, ROW, VOCAB, patterns_of


@dataclass
class ParallelSetup:
    engine: object                       # the DeepSpeed engine (a PipelineEngine with PP > 1)
    dp_rank: int
    dp_size: int
    dp_group: object
    train_step_fn: Optional[Callable] = None  # None: the trainer's micro-batch loop
    eval_fn: Optional[Callable] = None   # None: the trainer's micro-batch loop
    sample_model: Optional[nn.Module] = None  # tokens -> full logits, or None (pipeline)
    checkpoint_info: dict = field(default_factory=dict)  # extra client state
    tp_rng: Optional[TensorParallelRNG] = None  # the per-TP-rank dropout stream, when used:
                                         # saved and restored with each rank's RNG state


# How DeepSpeed's ds_to_universal must treat each parameter (it re.match-es these against
# names), from the one TP plan; column-parallel and sliced parameters are its default (dim 0).
UNIVERSAL_PATTERNS = {
    ds_ckpt.TP_REPLICATED_PARAMETER_PATTERNS: patterns_of(REPLICATED),
    ds_ckpt.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: patterns_of(ROW),
    ds_ckpt.VOCABULARY_PARAMETER_PATTERNS: patterns_of(VOCAB),
}


def universal_checkpoint_info(model: nn.Module, vocab_size: int, pipelined: bool) -> dict:
    """The client-state entry ds_to_universal needs. It insists that every pattern matches some
    parameter, so only the patterns this model's names use are kept."""
    names = [name for name, _ in model.named_parameters()]
    info = {kind: [p for p in patterns if any(re.match(p, n) for n in names)]
            for kind, patterns in UNIVERSAL_PATTERNS.items()}
    info[ds_ckpt.PIPELINE_REPLICATED_PARAMETER_PATTERNS] = (
        [r"(.*\.)?word\.weight$"] if pipelined and model.config.tie_embeddings else [])
    info[ds_ckpt.UNIVERSAL_CHECKPOINT_VERSION_KEY] = ds_ckpt.UNIVERSAL_CHECKPOINT_VERSION_VALUE
    info["original_vocab_size"] = vocab_size
    return {ds_ckpt.UNIVERSAL_CHECKPOINT_INFO: info}


def _pipeline_steps(engine):
    def pipe_batches(batches):
        for b in batches:
            b = move_batch(b, engine.device)
            yield b["tokens"], (b["labels"], b["loss_mask"])

    def train_step(batches):
        return engine.train_batch(data_iter=pipe_batches(batches))

    def evaluate(batches, global_batches: int):
        it = pipe_batches(batches)
        return torch.stack([engine.eval_batch(it) for _ in range(global_batches)]).mean()
    return train_step, evaluate


def setup_parallel(model: nn.Module, cfg: Config, task, load_universal: bool = False
                   ) -> ParallelSetup:
    p = cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = dist.get_world_size() // (tp * pp)
    state.initialize_groups(tp, pp)
    rng = TensorParallelRNG(cfg.train.seed, state.tp_rank())
    if tp > 1:
        apply_tensor_parallel(model, p.vocab_padding_multiple)
        task.cross_entropy = vocab_parallel_cross_entropy
        if cfg.model.dropout > 0:
            use_tensor_parallel_rng(model, rng)
    if p.activation_checkpointing:
        stacks = [s for s in (getattr(model, "encoder", None), getattr(model, "decoder", None)) if s]
        apply_activation_checkpointing([l for s in stacks for l in s.layers],
                                       rng if tp > 1 else None)
    info = universal_checkpoint_info(model, cfg.model.vocab_size, pipelined=pp > 1)
    common = dict(dp_rank=ps.get_data_parallel_rank(), dp_size=dp,
                  dp_group=ps.get_data_parallel_group(), checkpoint_info=info,
                  tp_rng=rng if tp > 1 else None)
    if pp > 1:
        loss_fn = lambda logits, labels: task.loss(  # noqa: E731
            logits, {"labels": labels[0], "loss_mask": labels[1]})
        engine = build_engine(build_pipeline(model, tp, pp, dp, loss_fn, p.pipeline_partition),
                              cfg, dp, load_universal=load_universal)
        train_step, evaluate = _pipeline_steps(engine)
        return ParallelSetup(engine=engine, train_step_fn=train_step, eval_fn=evaluate, **common)
    engine = build_engine(model, cfg, dp, mpu=state.DeepSpeedMPU(), load_universal=load_universal)
    sample_model = FullLogits(engine.module) if tp > 1 else engine.module
    return ParallelSetup(engine=engine, sample_model=sample_model, **common)
