"""DeepSpeed engine set-up around a parallelized model: optimizer parameter groups, the DeepSpeed
config, initialize(), and the pipeline engine's train/eval steps."""
from __future__ import annotations

import copy
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
from ..model import mup
from ..parallel.materialize import FullWeights
from ..parallel.setup import Parallelized, parallelize
from ..parallel.tensor_parallel import FullLogits, vocab_parallel_cross_entropy
from .schedule import make_scheduler
from .tasks import move_batch


def group_settings(cfg: Config) -> list:
    """The optimizer's parameter groups in order, without their parameters: {name, lr,
    weight_decay}. Matrices (projections, embeddings) decay; vectors (biases, norm gains, head
    scales) do not; under muP the hidden matrices are a group of their own with their LR
    scaled by base width / width (model/mup.py). The same list on every rank and in every
    layout, empty groups included: DeepSpeed's universal loader pairs saved and current
    groups by position."""
    t = cfg.train
    return [{"name": name, "lr": t.lr * multiplier,
             "weight_decay": 0.0 if name == mup.VECTORS else t.weight_decay}
            for name, multiplier in mup.group_lr_multipliers(cfg.model).items()]


def optimizer_param_groups(model: nn.Module, cfg: Config) -> list:
    groups = [{**settings, "params": []} for settings in group_settings(cfg)]
    index = {g["name"]: i for i, g in enumerate(groups)}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[index[mup.param_group(name, param.dim(), cfg.model)]]["params"].append(param)
    return groups


def describe_param_groups(optimizer) -> str:
    """'name lr=X' of each group DeepSpeed's optimizer steps (its param_groups, which ZeRO
    shares with the optimizer it wraps), for the start-up log."""
    return ", ".join(f"{g.get('name', i)} lr={g['lr']:.6g}"
                     for i, g in enumerate(optimizer.param_groups))


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


def offloaded_optimizer(ds_config: dict) -> Optional[str]:
    """Where ZeRO-Offload keeps the optimizer ("cpu" or "nvme"), or None: the
    zero_optimization.offload_optimizer.device of the config handed to DeepSpeed."""
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    device = offload.get("device", "none") if isinstance(offload, dict) else "none"
    return None if device in (None, "none") else device


def build_optimizer(model: nn.Module, cfg: Config, offload: Optional[str] = None
                    ) -> torch.optim.Optimizer:
    """AdamW over the parameter groups. With the optimizer offloaded (ZeRO-Offload, to CPU
    memory or NVMe) DeepSpeed steps it on the CPU and refuses any optimizer but its own
    vectorized CPU Adam (ZeRORuntimeException otherwise): DeepSpeedCPUAdam in AdamW mode,
    a C++ op DeepSpeed JIT-builds on first use (minutes, once per machine)."""
    t = cfg.train
    groups = optimizer_param_groups(model, cfg)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                eps=t.adam_eps, adamw_mode=True)
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
# DeepSpeed features a project setting takes the place of. The decoupled checkpoint writer
# returns from save_checkpoint before its files are written, and the checkpoint manager would
# digest and mark complete whatever was on disk by then; the project's background writer marks
# a checkpoint complete once it is on disk.
REPLACED = {"checkpoint.writer.decoupled": "checkpoint.async_save"}


# The dtype gradients are accumulated over micro-batches and all-reduced in, by
# train.precision. bf16 uses fp32, as Megatron does: DeepSpeed's default for a bf16 model is
# bf16 for both (runtime/engine.py get_data_types, communication_data_type), which rounds the
# running sum of a step's 32-512 micro-batch gradients to 8 bits of mantissa. With fp32
# accumulation DeepSpeed steps ZeRO-1 through its BF16_Optimizer (checkpoint files
# bf16_zero_pp_rank_*) and ZeRO-2/3 with a separate fp32 gradient buffer; it has no path for it
# without ZeRO, so config.validate refuses bf16 with train.zero_stage=0. fp16 keeps DeepSpeed's
# loss-scaled fp16 gradients.
GRADIENT_DTYPE = {"fp32": "fp32", "bf16": "fp32", "fp16": "fp16"}


def derived_keys(cfg: Config, dims: ParallelDims, load_universal: bool = False) -> dict:
    """The DeepSpeed keys the project sets from its own settings, dotted: {key: (value, the
    setting it comes from)}. The `deepspeed:` section may not set them (they would silently
    disagree with what the trainer does); the refusal says where each comes from."""
    t = cfg.train
    return {
        **_sequence_parallel_pipe_keys(cfg, dims),
        # DeepSpeed counts a micro-batch per rank of its data-parallel group, which is DP x CP
        # (state.py): the CP ranks of a group compute parts of the same samples, so its batch
        # is the global batch x CP (it uses the number only to check the batch arithmetic)
        "train_batch_size": (t.global_batch_size * dims.cp, "train.global_batch_size"),
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
        "data_types.grad_accum_dtype": (GRADIENT_DTYPE[t.precision], "train.precision"),
        "communication_data_type": (GRADIENT_DTYPE[t.precision], "train.precision"),
        # resuming another layout's checkpoint through its universal form (checkpoint/reshard.py)
        "checkpoint.load_universal": (load_universal, "the resume logic (set when resuming "
                                                      "another layout)"),
    }


def _sequence_parallel_pipe_keys(cfg: Config, dims: ParallelDims) -> dict:
    """DeepSpeed's pipeline sends 1/TP of each stage's output (and of each input gradient) per
    TP rank and all-gathers the rest on the receiving side, since under TP they are equal on
    every TP rank. Under sequence parallelism each TP rank holds its own part of the sequence,
    so that rebuilt every tensor from the halves of different ones (TP2+SP x PP2's losses left
    the single-process run's by 0.02 at step 2): each rank sends its whole tensor instead."""
    if not (dims.pipelined and cfg.parallel.sequence_parallel):
        return {}
    source = "parallel.sequence_parallel (the TP ranks' activations differ)"
    return {"pipeline.pipe_partitioned": (False, source),
            "pipeline.grad_partitioned": (False, source)}


def _defaults(cfg: Config, dims: ParallelDims) -> dict:
    """Settings the `deepspeed:` section may override."""
    t = cfg.train
    zero = {}
    if t.zero_stage in (1, 2) and not torch.cuda.is_available():
        # contiguous_gradients copies every gradient once more into a bucket to spare the GPU
        # allocator fragmentation; on CPU it cost 4% of the default run's step (1 rank, one
        # process beside the default and a plain loop; tools/bench_train.py measures the rest).
        zero["contiguous_gradients"] = False
    if t.zero_stage in (1, 2) and torch.cuda.is_available() and not dims.pipelined:
        # Reduce gradient buckets on a side stream while backward goes on (Megatron's DDP
        # overlaps too); DeepSpeed leaves it off below ZeRO-3, and its pipeline engine turns
        # it off itself (with a warning), so it is not set there.
        zero["overlap_comm"] = True
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
        if isinstance(value, dict):  # a new mapping too: a refused key may be inside it
            base_value = merged.get(key) if isinstance(merged.get(key), dict) else {}
            merged[key] = _merge(base_value, value, refused, f"{dotted}.")
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
    check_offload(merged, cfg.train.zero_stage)


def check_offload(ds_config: dict, zero_stage: int) -> None:
    """What DeepSpeed's config class lets through and its engine gets wrong: offload without
    ZeRO (nothing is partitioned to offload), parameter offload below ZeRO-3 (only ZeRO-3
    partitions parameters; ZeRO-1/2 ignore it), NVMe below ZeRO-3 (ZeRO-1/2 take any
    optimizer offload device as CPU memory, silently) and NVMe without DeepSpeed's async_io op
    (a C++ op built against libaio; without it the first step dies in the JIT build)."""
    zero = ds_config.get("zero_optimization", {})
    for what in ("offload_optimizer", "offload_param"):
        device = (zero.get(what) or {}).get("device", "none")
        if device in (None, "none"):
            continue
        key = f"deepspeed.zero_optimization.{what}.device={device}"
        if zero_stage == 0:
            raise ConfigError(f"{key} needs ZeRO: set train.zero_stage to 1, 2 or 3")
        if what == "offload_param" and zero_stage != 3:
            raise ConfigError(f"{key}: only ZeRO-3 partitions (and so offloads) parameters; "
                              "set train.zero_stage=3, or offload the optimizer only")
        if device != "nvme":
            continue
        if zero_stage != 3:
            raise ConfigError(f"{key}: DeepSpeed offloads to NVMe under ZeRO-3 only (ZeRO-1/2 "
                              f"would keep the state in CPU memory); set train.zero_stage=3, or "
                              f"device=cpu")
        if not zero[what].get("nvme_path"):
            raise ConfigError(f"{key} needs deepspeed.zero_optimization.{what}.nvme_path (a "
                              "directory on the NVMe drive, one per node)")
        from deepspeed.ops.op_builder import AsyncIOBuilder
        if not AsyncIOBuilder().is_compatible(verbose=False):
            raise ConfigError(f"{key}: DeepSpeed's async_io op cannot be built on this machine "
                              "(it needs libaio: apt install libaio-dev, then check with "
                              "ds_report); use device=cpu")


def deepspeed_config(cfg: Config, dims: ParallelDims, load_universal: bool = False) -> dict:
    """The DeepSpeed config this run hands to deepspeed.initialize: the derived keys, the
    overridable defaults, and the `deepspeed:` section over both."""
    derived = derived_keys(cfg, dims, load_universal)
    generated = _merge(_defaults(cfg, dims), _nest({k: v for k, (v, _) in derived.items()}), {})
    refused = {**{k: source for k, (_, source) in derived.items()}, **PASSED_AS_OBJECTS,
               **REPLACED}
    return _merge(generated, cfg.deepspeed, refused)


def build_engine(model: nn.Module, cfg: Config, dims: ParallelDims, mpu=None,
                 load_universal: bool = False):
    """-> (the DeepSpeed engine: optimizer, fp16/bf16, ZeRO and the LR schedule inside;
    the config it was given)."""
    ds_config = deepspeed_config(cfg, dims, load_universal)
    optimizer = build_optimizer(model, cfg, offloaded_optimizer(ds_config))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=make_scheduler(optimizer, cfg.train),
        config=copy.deepcopy(ds_config), mpu=mpu)  # the record stays as it was handed over
    check_group_list(engine.optimizer, cfg)
    return engine, ds_config


def check_group_list(optimizer, cfg: Config) -> None:
    """Every group of group_settings is there, in order. DeepSpeed drops a group without
    parameters (runtime/engine.py, 'Removing param_group that has no params'), after the LR
    schedule took its per-group LRs by position, and its universal loader pairs saved groups
    with these by position: a missing group would give the next one another group's LR and
    weight decay, silently."""
    expected = [g["name"] for g in group_settings(cfg)]
    got = [g.get("name") for g in optimizer.param_groups]
    if got != expected:
        raise ValueError(f"this rank's optimizer has parameter groups {got}, not {expected}: "
                         "its shard holds no parameter of the missing group (a pipeline stage "
                         "with no transformer layer?); use parallel.pipeline_partition=layers "
                         "or fewer pipeline stages")


@dataclass
class TrainingSetup:
    engine: object                       # the DeepSpeed engine (a PipelineEngine with PP > 1)
    par: Parallelized                    # what parallelize() made of the model
    train_step_fn: Optional[Callable] = None  # None: the trainer's micro-batch loop
    eval_fn: Optional[Callable] = None   # None: the trainer's micro-batch loop
    sample_model: Optional[nn.Module] = None  # tokens -> full logits, or None (pipeline)
    checkpoint_info: dict = field(default_factory=dict)  # client state ds_to_universal needs
    deepspeed_config: dict = field(default_factory=dict)  # the config handed to DeepSpeed


def _pipeline_steps(engine, task, par: Parallelized):
    def pipe_batches(batches):
        """(inputs, (labels, loss mask)) per micro-batch; the inputs are the tokens, or the
        tuple (tokens, position_ids[, document_ids]) that the stages pass on (pipeline.py)."""
        for b in batches:
            b = par.local_batch(task.prepare(move_batch(b, engine.device)))
            inputs = tuple(b[k] for k in ("tokens", "position_ids", "document_ids") if k in b)
            yield inputs if len(inputs) > 1 else inputs[0], (b["labels"], b["loss_mask"])

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
    engine, ds_config = build_engine(par.module, cfg, dims, mpu=par.mpu,
                                     load_universal=load_universal)
    common = dict(engine=engine, par=par, checkpoint_info=info, deepspeed_config=ds_config)
    if dims.pipelined:
        train_step, evaluate = _pipeline_steps(engine, task, par)
        return TrainingSetup(train_step_fn=train_step, eval_fn=evaluate, **common)
    sample_model = (FullLogits(engine.module, cfg.parallel.sequence_parallel) if tp > 1
                    else engine.module)
    return TrainingSetup(sample_model=sample_model, **common)
