"""DeepSpeed engine set-up around a parallelized model: optimizer parameter groups, the DeepSpeed
config, initialize(), and the pipeline engine's train/eval steps."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint.universal_info import universal_checkpoint_info
from ..compat.ds_engine import OVERFLOW
from ..config import Config, ConfigError
from ..dims import ParallelDims
from ..parallel.materialize import FullWeights
from ..parallel.setup import Parallelized, parallelize
from ..parallel.tensor_parallel import FullLogits, vocab_parallel_cross_entropy
from .schedule import make_scheduler
from .tasks import move_batch


def group_weight_decays(weight_decay: float) -> list:
    """The optimizer's parameter groups in order: matrices (projections, embeddings) decay;
    biases, norm gains and head scales do not."""
    return [weight_decay, 0.0]


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": params, "weight_decay": wd}
            for params, wd in zip((decay, no_decay), group_weight_decays(weight_decay))]


class SkipNonFiniteSteps:
    """Optimizer mixin: a step whose gradients hold an inf or NaN on any rank applies nothing
    (weights, moments and Adam's step count stay as they were), as DeepSpeed's fp16 loss scaler
    does. DeepSpeed's ZeRO-1/2/3 optimizers skip such steps themselves (measured here, fp32);
    without ZeRO (stage 0) the engine calls this optimizer directly and applied the NaN update,
    which ruins every later step and checkpoint. So the guard wraps the optimizer without ZeRO
    only: under ZeRO it repeated DeepSpeed's own check, a pass over every gradient and an
    all-reduce per step (about 1% of the default run's step, tools/bench_train.py), and
    tests/dist/test_guards.py checks the skip on every stage. DeepSpeed calls it on every rank,
    so the flag is agreed over the world. The skip is reported in the optimizer attribute that
    DeepSpeed's engine reads to count a skipped step and hold the LR schedule
    (compat.ds_engine.OVERFLOW).
    """

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else self.param_groups[0]["params"][0].device
        bad = torch.zeros(1, device=device)
        if grads:
            bad[0] = (~torch.stack([g.isfinite().all() for g in grads]).all()).float()
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        skipped = bool(bad.item())
        setattr(self, OVERFLOW, skipped)
        return None if skipped else super().step(closure)


def _guarded(optimizer_class):
    return type(f"SkipNonFinite{optimizer_class.__name__}", (SkipNonFiniteSteps, optimizer_class),
                {})


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    groups = optimizer_param_groups(model, t.weight_decay)
    guard = _guarded if t.zero_stage == 0 else (lambda optimizer_class: optimizer_class)
    try:  # NVIDIA apex is optional; its fused Adam is a little faster than torch's on GPU
        from apex.optimizers import FusedAdam  # type: ignore
        if torch.cuda.is_available():
            return guard(FusedAdam)(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                    eps=t.adam_eps, adam_w_mode=True)
    except ImportError:
        pass
    return guard(torch.optim.AdamW)(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                    eps=t.adam_eps, fused=torch.cuda.is_available())


# Passed to deepspeed.initialize as objects built from the train section; a config section of
# the same name would make DeepSpeed build a second optimizer or schedule.
PASSED_AS_OBJECTS = {
    "optimizer": "train.lr, train.adam_* and train.weight_decay (the project builds AdamW)",
    "scheduler": "train.warmup_iters, train.lr_decay_style and train.min_lr",
}


def derived_keys(cfg: Config, dims: ParallelDims, load_universal: bool = False) -> dict:
    """The DeepSpeed keys the project sets from its own settings, dotted: {key: (value, the
    setting it comes from)}. The `deepspeed:` section may not set them (they would silently
    disagree with what the trainer does); the refusal says where each comes from."""
    t = cfg.train
    return {
        "train_batch_size": (t.global_batch_size, "train.global_batch_size"),
        "train_micro_batch_size_per_gpu": (t.micro_batch_size, "train.micro_batch_size"),
        "gradient_accumulation_steps": (
            dims.grad_accum, "train.global_batch_size / (train.micro_batch_size x DP)"),
        "gradient_clipping": (t.grad_clip, "train.grad_clip"),
        "zero_optimization.stage": (t.zero_stage, "train.zero_stage"),
        "bf16.enabled": (t.precision == "bf16", "train.precision"),
        # ZeRO skips a non-finite bf16 step only with this set (its default today, kept
        # explicit: SkipNonFiniteSteps is not repeated under ZeRO)
        "bf16.check_grad_overflow": (True, "the non-finite step rule "
                                           "(train.max_nonfinite_steps)"),
        "fp16.enabled": (t.precision == "fp16", "train.precision"),
        # resuming another layout's checkpoint through its universal form (checkpoint/reshard.py)
        "checkpoint.load_universal": (load_universal, "the resume logic (set when resuming "
                                                      "another layout)"),
    }


def _defaults(cfg: Config) -> dict:
    """Settings the `deepspeed:` section may override."""
    t = cfg.train
    zero = {}
    if t.zero_stage in (1, 2) and not torch.cuda.is_available():
        # contiguous_gradients copies every gradient once more into a bucket to spare the GPU
        # allocator fragmentation; on CPU it cost 4% of the default run's step (1 rank, one
        # process beside the default and a plain loop; tools/bench_train.py measures the rest).
        zero["contiguous_gradients"] = False
    if t.zero_stage == 3:
        # Partition every parameter: the default threshold (1e5) leaves small ones whole, which
        # under tensor parallelism mixes replicated and sharded layouts in one partition.
        zero["stage3_param_persistence_threshold"] = 0
    return {"zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "fp16": {"loss_scale": 0, "initial_scale_power": 16},  # dynamic loss scaling
            "steps_per_print": 10 ** 9,  # our metrics logger reports; keep DeepSpeed quiet
            "wall_clock_breakdown": False}


def _nest(dotted: dict) -> dict:
    nested = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        target = nested
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return nested


def _merge(base: dict, extra: dict, refused: dict, prefix: str = "") -> dict:
    """`extra` deep-merged over `base`; a dotted key in `refused` is refused by name."""
    merged = dict(base)
    for key, value in extra.items():
        dotted = f"{prefix}{key}"
        if dotted in refused:
            raise ConfigError(f"deepspeed.{dotted} is set by the project from "
                              f"{refused[dotted]}; set that instead")
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value, refused, f"{dotted}.")
        else:
            merged[key] = value
    return merged


def check_deepspeed_section(cfg: Config, dims: ParallelDims) -> None:
    """The merged config through DeepSpeed's own config class, before any process group forms
    (its pydantic models name a bad key or value). Without a process group DeepSpeed takes the
    world size as 1, so the batch keys are checked for one data-parallel rank."""
    from deepspeed.runtime.config import DeepSpeedConfig

    merged = deepspeed_config(cfg, dims)
    merged["train_batch_size"] = cfg.train.global_batch_size // dims.dp
    try:
        DeepSpeedConfig(merged)
    # DeepSpeed's config class reports a bad key or value with pydantic's ValidationError or
    # its own asserts and ValueErrors; the message, whole, becomes the config error
    except (ValueError, AssertionError, TypeError, KeyError) as err:
        raise ConfigError(f"deepspeed: DeepSpeed rejects the merged config: "
                          f"{' '.join(str(err).split())}") from err


def deepspeed_config(cfg: Config, dims: ParallelDims, load_universal: bool = False) -> dict:
    """The DeepSpeed config this run hands to deepspeed.initialize: the derived keys, the
    overridable defaults, and the `deepspeed:` section over both."""
    derived = derived_keys(cfg, dims, load_universal)
    generated = _merge(_defaults(cfg), _nest({k: v for k, (v, _) in derived.items()}), {})
    refused = {**{k: source for k, (_, source) in derived.items()}, **PASSED_AS_OBJECTS}
    return _merge(generated, cfg.deepspeed, refused)


def build_engine(model: nn.Module, cfg: Config, dims: ParallelDims, mpu=None,
                 load_universal: bool = False):
    """-> DeepSpeed engine (optimizer, fp16/bf16, ZeRO and the LR schedule inside)."""
    optimizer = build_optimizer(model, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=make_scheduler(optimizer, cfg.train),
        config=deepspeed_config(cfg, dims, load_universal), mpu=mpu)
    return engine


@dataclass
class TrainingSetup:
    engine: object                       # the DeepSpeed engine (a PipelineEngine with PP > 1)
    par: Parallelized                    # what parallelize() made of the model
    train_step_fn: Optional[Callable] = None  # None: the trainer's micro-batch loop
    eval_fn: Optional[Callable] = None   # None: the trainer's micro-batch loop
    sample_model: Optional[nn.Module] = None  # tokens -> full logits, or None (pipeline)
    checkpoint_info: dict = field(default_factory=dict)  # client state ds_to_universal needs


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


def build_training(model: nn.Module, cfg: Config, dims: ParallelDims, task,
                   weights: Optional[FullWeights] = None,
                   load_universal: bool = False) -> TrainingSetup:
    """parallelize() the model (a meta-device skeleton filled from `weights`, or a full model),
    then the DeepSpeed engine around this rank's shard."""
    tp = dims.tp
    if (tp > 1) != (task.cross_entropy is vocab_parallel_cross_entropy):
        raise ValueError(f"TP{tp}: the task's cross-entropy must be "
                         f"{'vocab-parallel' if tp > 1 else 'the plain one'}; create it with "
                         f"tensor_parallel={tp > 1}")
    info = universal_checkpoint_info([n for n, _ in model.named_parameters()],
                                     cfg.model.vocab_size, dims.pipelined,
                                     cfg.model.tie_embeddings)
    par = parallelize(model, cfg, dims, weights, pipeline_loss=task.pipeline_loss)
    engine = build_engine(par.module, cfg, dims, mpu=par.mpu,
                          load_universal=load_universal)
    if dims.pipelined:
        train_step, evaluate = _pipeline_steps(engine)
        return TrainingSetup(engine=engine, par=par, train_step_fn=train_step, eval_fn=evaluate,
                             checkpoint_info=info)
    sample_model = FullLogits(engine.module) if tp > 1 else engine.module
    return TrainingSetup(engine=engine, par=par, sample_model=sample_model, checkpoint_info=info)
