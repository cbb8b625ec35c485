"""Entry point shared by launch/pretrain_gpt.py and launch/pretrain_bert.py: the wiring.

Order matters: config validation, data and index caches (per node) and the resume checks all
happen before torch.distributed starts, so a mistake costs seconds, not a cluster allocation.
What they decide is a RunPlan; the process group, the engine and the loop come after.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from ..checkpoint import manager as ckpt
from ..checkpoint import reshard
from ..checkpoint.export import check_consolidated, consolidated_weights
from ..checkpoint.storage import agree_on_resume
from ..config import Config, dump_config, load_config, validate, with_vocab_size
from ..data.datasets import train_samples
from ..data.run_tokenizer import check_resume_tokenizer, save_run_tokenizer
from ..data.setup import load_tokenizer, prepare_data
from ..dims import ParallelDims, describe
from ..errors import ConfigError, ExitCode, MagnetoError
from ..files import atomic_write
from ..launch_env import RankInfo, default_config, set_cpu_threads, single_process_env
from ..model import InitWeights, flops_per_token, model_skeleton
from ..resilience.faults import Faults, faults_from_env
from ..resilience.parent_watch import launcher_chain
from ..resilience.watchdog import die_with_parent
from .generate import sample
from .loop import Trainer, TrainState
from .metrics import MetricsLogger, device_peak_tflops, process_start_time
from .preflight import PreflightError, RunLock, check_run_dir_writable, finished_message
from .tasks import GPTTask, MaskedLMTask

TASKS = {"gpt": GPTTask, "bert": MaskedLMTask}
DEEPSPEED_CONFIG = "deepspeed_config.json"  # in the run directory: the config DeepSpeed got


@dataclass
class RunPlan:
    """Everything decided before torch.distributed starts."""
    cfg: Config                 # validated, vocabulary from the tokenizer
    dims: ParallelDims          # the layout
    task: object                # the objective (tasks.GPTTask / MaskedLMTask)
    tokenizer: object
    train_ds: object
    valid_ds: object
    ckpt_dir: str
    resume: Optional[reshard.ResumeSource]  # None: a fresh start
    train_samples: int          # the training split's size (data.datasets.train_samples)
    ranks: RankInfo
    faults: Faults              # fault injection (tests); NO_FAULTS otherwise


def parse_args(task: str, argv: Optional[List[str]]):
    p = argparse.ArgumentParser(
        description=f"Pretrain a Magneto {task.upper()} with DeepSpeed.",
        epilog="overrides: section.key=value, e.g. train.train_iters=100 model.norm=pre_ln")
    p.add_argument("--config", default=default_config(task),
                   help=f"YAML config (default {os.path.relpath(default_config(task))})")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p.parse_args(argv)


def resolve(task: str, argv) -> Config:
    args = parse_args(task, argv)
    cfg = load_config(args.config, args.overrides)
    if cfg.model.arch != TASKS[task].arch:
        raise ConfigError(f"model.arch={cfg.model.arch!r} does not fit this script (it trains "
                          f"arch={TASKS[task].arch!r}); use launch/pretrain_"
                          f"{'bert' if cfg.model.arch == 'encoder' else 'gpt'}.py")
    return cfg


def choose_resume_tag(cfg: Config, dims: ParallelDims, ckpt_dir: str,
                      ranks: RankInfo) -> Tuple[Optional[str], Optional[Tuple[dict, dict]]]:
    """The checkpoint to resume from, checked against this run's model and layout (this rank
    verifies its share of the files' contents), and the (saved, current) layouts when they
    differ."""
    tag = ckpt.find_resume_tag(
        ckpt_dir, cfg.checkpoint.resume, log=ranks.log, share=(ranks.rank, ranks.world_size),
        warn=lambda message: print(f"rank {ranks.rank}: " * (ranks.world_size > 1) + message,
                                   flush=True))
    if not tag:
        return None, None
    ckpt.check_compatible(ckpt_dir, tag, cfg)
    for change in ckpt.data_order_changes(ckpt_dir, tag, cfg):
        ranks.log(f"WARNING: {change}: the samples come in another order than the checkpoint's "
                  "run drew them, so resuming at its data position repeats some samples and "
                  "skips others; set the checkpoint's value to continue exactly")
    before, now = ckpt.saved_layout(ckpt_dir, tag), dims.layout
    if before == now:
        return tag, None
    why_not = reshard.refusal(before, now)
    if why_not:
        raise ckpt.CheckpointError(
            f"checkpoint {ckpt_dir}/{tag} was written by layout {describe(before)} "
            f"and this run is {describe(now)}: {why_not}")
    return tag, (before, now)


def resume_source(ckpt_dir: str, tag: str, change: Optional[Tuple[dict, dict]],
                  ranks: RankInfo, faults: Faults) -> reshard.ResumeSource:
    """Where the engine loads `tag` from: the tag itself, or (another layout) its universal
    form, built here before torch.distributed starts."""
    if change is None:
        return reshard.ResumeSource(tag=tag, load_dir=ckpt_dir, load_tag=tag)
    before, now = change
    ranks.log(f"changing layouts: {tag} was written by {describe(before)}, this run is "
              f"{describe(now)}; resuming through the universal checkpoint")
    return reshard.universal_source(ckpt_dir, tag, ranks.local_rank, log=ranks.log,
                                    faults=faults, rank=ranks.rank)


def train_split_size(cfg: Config, ckpt_dir: str, tag: Optional[str], ranks: RankInfo) -> int:
    """The training split's size: a fresh start's, or from the resume tag's data position on
    (with another global batch than the checkpoint's, its steps left take another number of
    samples), never smaller than the size that tag's run used (which keeps the order)."""
    t = cfg.train
    if not tag:
        return train_samples(t.train_iters, t.global_batch_size)
    marker, saved = ckpt.read_marker(ckpt_dir, tag), ckpt.saved_config(os.path.join(ckpt_dir, tag))
    consumed = marker.get("consumed_samples") or marker["step"] * saved.train.global_batch_size
    if saved.train.global_batch_size != t.global_batch_size:
        ranks.log(f"train.global_batch_size: checkpoint {saved.train.global_batch_size}, config "
                  f"{t.global_batch_size}: continuing at sample {consumed}, "
                  f"{t.global_batch_size} per step")
    return train_samples(t.train_iters, t.global_batch_size, marker["step"], consumed,
                         at_least=marker.get("train_samples") or
                         saved.train.train_iters * saved.train.global_batch_size)


def main(task: str, argv: Optional[List[str]] = None) -> int:
    """The process's exit code (errors.ExitCode). The project's own errors (config, data,
    checkpoint, no space) end it with one line and their code; anything else is unexpected and
    keeps its traceback (exit 1, which the fault-tolerant launcher retries)."""
    die_with_parent()  # under launch/ft_launch.py: no rank outlives its agent
    single_process_env()
    launcher_chain()  # who launched us, noted while they are alive (see parent_watch)
    ranks = RankInfo()
    try:
        plan = plan_run(task, argv, ranks, faults_from_env())
        return int(ExitCode.OK if plan is None else train(plan))
    except MagnetoError as err:
        print(f"{err.label}: {err}", file=sys.stderr, flush=True)
        return int(err.exit_code)


def preflight(task: str, argv, ranks: RankInfo) -> Tuple[Config, ParallelDims]:
    """The validated config and layout; the run directory writable."""
    cfg = resolve(task, argv)
    dims = validate(cfg, ranks.world_size, torch.cuda.is_available())
    if cfg.deepspeed:  # DeepSpeed's import costs seconds that other config errors skip
        from .engine import check_deepspeed_section
        check_deepspeed_section(cfg, dims)
    check_run_dir_writable(cfg.logging.run_dir)
    if cfg.train.warmup_iters > cfg.train.train_iters:
        ranks.log(f"train.warmup_iters={cfg.train.warmup_iters} is longer than "
                  f"train.train_iters={cfg.train.train_iters}: warming up over all "
                  f"{cfg.train.train_iters} steps")
    return cfg, dims


def plan_run(task: str, argv, ranks: RankInfo, faults: Faults) -> Optional[RunPlan]:
    """Every check that can fail, before torch.distributed starts: config, tokenizer, the
    resume point and its layout, data and index caches, a layout change's universal form.
    None: the run is already finished."""
    cfg, dims = preflight(task, argv, ranks)
    set_cpu_threads(ranks)
    tokenizer, prefixes = load_tokenizer(cfg, ranks)
    if cfg.model.vocab_size != tokenizer.vocab_size:
        ranks.log(f"model.vocab_size set from the tokenizer: {tokenizer.vocab_size}")
    # The model has exactly the tokenizer's vocabulary; tensor parallelism pads its own shards.
    cfg = with_vocab_size(cfg, tokenizer.vocab_size)
    ckpt_dir = os.path.join(cfg.logging.run_dir, "checkpoints")
    resume_tag, layout_change = choose_resume_tag(cfg, dims, ckpt_dir, ranks)
    if resume_tag:
        check_resume_tokenizer(cfg.logging.run_dir, tokenizer)
    if not resume_tag and cfg.checkpoint.init_from:
        check_consolidated(cfg.checkpoint.init_from, cfg)
    if resume_tag:
        done = finished_message(cfg.logging.run_dir, resume_tag,
                                ckpt.read_marker(ckpt_dir, resume_tag)["step"], cfg.train)
        if done:  # a rerun of a finished command rewrites nothing
            ranks.log(done)
            return None
    num_train = train_split_size(cfg, ckpt_dir, resume_tag, ranks)
    train_ds, valid_ds, _ = prepare_data(cfg, task, tokenizer, prefixes, ranks, num_train)
    resume = (resume_source(ckpt_dir, resume_tag, layout_change, ranks, faults) if resume_tag
              else None)
    objective = TASKS[task].for_run(cfg, dims, tokenizer.vocab_size, tokenizer.eod)
    return RunPlan(cfg=cfg, dims=dims, task=objective, tokenizer=tokenizer, train_ds=train_ds,
                   valid_ds=valid_ds, ckpt_dir=ckpt_dir, resume=resume,
                   train_samples=num_train, ranks=ranks, faults=faults)


def lock_run_dir(run_dir: str, ranks: RankInfo) -> Tuple[RunLock, Optional[str]]:
    """Collective: rank 0 takes RUN_DIR/run.lock; every rank learns whether it was refused."""
    lock, refusal = RunLock(run_dir), [None]
    if ranks.rank == 0:
        try:
            lock.acquire(log=ranks.log)
        except PreflightError as err:
            refusal = [str(err)]
    dist.broadcast_object_list(refusal, src=0)
    return lock, refusal[0]


def train(plan: RunPlan) -> ExitCode:
    """The process group, the run directory's lock, every rank agreeing on the resume tag,
    then the run itself."""
    # deferred: importing DeepSpeed and megatron costs seconds that config errors should not pay
    from ..parallel.state import init_distributed, set_local_device

    # before any group or generator touches "the" device
    set_local_device(plan.ranks.local_rank, plan.ranks.local_world_size, plan.dims.tp)
    init_distributed(plan.cfg.parallel.timeout_minutes)
    lock, refusal = lock_run_dir(plan.cfg.logging.run_dir, plan.ranks)
    if refusal:  # said once, by rank 0; the other ranks exit with the same code
        if plan.ranks.rank == 0:
            raise PreflightError(refusal)
        return ExitCode.CONFIG
    try:
        disagreement = agree_on_resume(plan.ckpt_dir, plan.resume and plan.resume.tag,
                                       plan.ranks.log)
        if disagreement:  # the same on every rank; said once, by rank 0
            if plan.ranks.rank == 0:
                raise disagreement
            return disagreement.exit_code
        code = train_locked(plan)
    finally:
        lock.release()
    if code in (ExitCode.OK, ExitCode.INTERRUPTED, ExitCode.NONFINITE):  # every rank together
        # Shut the process group down before the interpreter does: a rank that exited with
        # gloo's threads still running once died with "terminate called without an active
        # exception" (SIGABRT) after a complete run.
        dist.barrier()
        dist.destroy_process_group()
    return code


def build_setup(cfg: Config, dims: ParallelDims, task, resume: Optional[reshard.ResumeSource],
                ranks: RankInfo):
    """This rank's shard inside the DeepSpeed engine (engine.TrainingSetup). Every rank
    materializes only its shard of the meta-device skeleton, each parameter sliced from its
    full tensor made one at a time: from (seed, name), or read from an export."""
    from .engine import build_training

    torch.manual_seed(cfg.train.seed)  # the default stream: dropout, as in a single process
    model = model_skeleton(cfg.model)
    if cfg.checkpoint.init_from and not resume:
        weights = consolidated_weights(cfg.checkpoint.init_from)
        ranks.log(f"weights from {cfg.checkpoint.init_from} (fresh optimizer, step 0)")
    else:
        weights = InitWeights(model, cfg.model, cfg.train.seed)
    return build_training(model, cfg, dims, task, weights,
                          load_universal=bool(resume and resume.universal))


def make_trainer(cfg: Config, task, setup, train_ds, valid_ds, ckpt_dir: str, state: TrainState,
                 ranks: RankInfo, faults: Optional[Faults] = None,
                 train_size: Optional[int] = None) -> Trainer:
    """The training loop around a built setup, with its metrics logger."""
    metrics = MetricsLogger(cfg.logging.run_dir, ranks.rank == 0, cfg.logging.tensorboard,
                            flops_per_token(cfg.model, cfg.model.max_seq_len), ranks.world_size,
                            device_peak_tflops(cfg.logging.peak_tflops, log=ranks.log))
    extra = {"faults": faults} if faults is not None else {}
    return Trainer(cfg, task, setup, train_ds, valid_ds, metrics, ckpt_dir, state,
                   lambda s: {"step": s.step, "consumed_samples": s.consumed_samples,
                              "train_samples": train_size, **setup.checkpoint_info},
                   log=ranks.log, **extra)


def resume_state(plan: RunPlan, setup) -> Tuple[TrainState, dict]:
    """Load the resume checkpoint into the engine; -> the loop's state and the client state."""
    from ..compat.ds_universal import repair_zero3_universal_load
    from .engine import describe_param_groups, group_settings

    resume, cfg = plan.resume, plan.cfg
    client = ckpt.load(setup.engine, resume.load_dir, resume.load_tag)
    if resume.universal and cfg.train.zero_stage == 3:
        repair_zero3_universal_load(setup.engine, group_settings(cfg))
    state = TrainState(step=client["step"], consumed_samples=client["consumed_samples"])
    plan.ranks.log(f"resumed from {plan.ckpt_dir}/{resume.tag}: step {state.step}, "
                   f"{state.consumed_samples} samples consumed; optimizer groups: "
                   f"{describe_param_groups(setup.engine.optimizer)}")
    return state, client


def train_locked(plan: RunPlan) -> ExitCode:
    cfg, ranks = plan.cfg, plan.ranks
    if ranks.rank == 0:
        dump_config(cfg, os.path.join(cfg.logging.run_dir, "config.yaml"))
        save_run_tokenizer(cfg.logging.run_dir, plan.tokenizer)
    setup = build_setup(cfg, plan.dims, plan.task, plan.resume, ranks)
    if ranks.rank == 0:  # what DeepSpeed was really given: derived keys, defaults, deepspeed:
        atomic_write(os.path.join(cfg.logging.run_dir, DEEPSPEED_CONFIG),
                     json.dumps(setup.deepspeed_config, indent=2) + "\n")
    load_start = time.time()
    state, client = resume_state(plan, setup) if plan.resume else (TrainState(), {})
    trainer = make_trainer(cfg, plan.task, setup, plan.train_ds, plan.valid_ds, plan.ckpt_dir,
                           state, ranks, plan.faults, plan.train_samples)
    if plan.resume:  # the steps replayed since the checkpoint follow this row in metrics.jsonl
        trainer.metrics.resumed(state.step, plan.resume.tag, process_start_time(), load_start)
        trainer.restore_tp_rng(client.get("_rng"))
    code = trainer.train()
    trainer.metrics.close()
    if code == ExitCode.OK and cfg.logging.sample_prompt and plan.task.name == "gpt":
        print_sample(cfg, setup, plan.tokenizer, ranks)
    return code


def print_sample(cfg: Config, setup, tokenizer, ranks: RankInfo) -> None:
    """A continuation of logging.sample_prompt from the trained model."""
    if setup.sample_model is None:
        ranks.log("no sample: no rank of a pipeline-parallel model runs a whole forward "
                  "(tools/generate.py samples from its checkpoints)")
        return
    ids = sample(setup.sample_model, tokenizer.encode(cfg.logging.sample_prompt),
                 cfg.logging.sample_tokens, tokenizer.vocab_size, cfg.model.max_seq_len,
                 seed=cfg.train.seed, eod=tokenizer.eod)
    ranks.log(f"sample> {tokenizer.decode(ids)}")
