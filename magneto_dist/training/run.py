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
from ..checkpoint.export import consolidated_weights
from ..checkpoint.resume import (INIT_FROM, UNIVERSAL_FORM, ResumePlan, load_source, manual_skip,
                                 plan_resume)
from ..checkpoint.storage import agree_on_resume
from ..checkpoint.tags import Tag
from ..config import Config, dump_config, load_config, validate, with_vocab_size
from ..data.run_tokenizer import save_run_tokenizer
from ..data.setup import load_tokenizer, prepare_data
from ..dims import ParallelDims
from ..errors import ConfigError, ExitCode, MagnetoError
from ..files import atomic_write
from ..launch_env import RankInfo, default_config, set_cpu_threads, single_process_env
from ..model import InitWeights, flops_per_token, model_skeleton
from ..resilience.faults import Faults, faults_from_env
from ..resilience.parent_watch import Launchers, launcher_chain
from ..resilience.watchdog import die_with_parent
from .generate import sample
from .healing import skip_data
from .loop import Trainer, TrainState
from .metrics import MetricsLogger, device_peak_tflops, process_start_time
from .preflight import PreflightError, RunLock, check_run_dir_writable
from .rollback import load_train_state
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
    resume: ResumePlan          # where the run starts: a tag, init_from's weights, or fresh
    load_from: Optional[Tag]    # what the engine loads: the tag or its universal form
    ranks: RankInfo
    faults: Faults              # fault injection (tests); NO_FAULTS otherwise
    launchers: Launchers        # the launchers above this process, watched while training


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


def main(task: str, argv: Optional[List[str]] = None) -> int:
    """The process's exit code (errors.ExitCode). The project's own errors (config, data,
    checkpoint, no space) end it with one line and their code; anything else is unexpected and
    keeps its traceback (exit 1, which the fault-tolerant launcher retries)."""
    die_with_parent()  # under launch/ft_launch.py: no rank outlives its agent
    single_process_env()
    launchers = launcher_chain()  # noted first thing, while they are all alive (parent_watch)
    ranks = RankInfo()
    try:
        plan = plan_run(task, argv, ranks, faults_from_env(), launchers)
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


def plan_run(task: str, argv, ranks: RankInfo, faults: Faults,
             launchers: Launchers = ()) -> Optional[RunPlan]:
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
    resume = plan_resume(cfg, dims, tokenizer, share=(ranks.rank, ranks.world_size),
                         warn=lambda line: print(f"rank {ranks.rank}: " * (ranks.world_size > 1)
                                                 + line, flush=True), log=ranks.log)
    for line in resume.warnings:
        ranks.log(line)
    if resume.finished:  # a rerun of a finished command rewrites nothing
        ranks.log(resume.finished)
        return None
    train_ds, valid_ds, _ = prepare_data(cfg, task, tokenizer, prefixes, ranks,
                                         resume.train_samples)
    load_from = load_source(resume, ranks.local_rank, log=ranks.log, faults=faults,
                            rank=ranks.rank)
    objective = TASKS[task].for_run(cfg, dims, tokenizer.vocab_size, tokenizer.eod)
    return RunPlan(cfg=cfg, dims=dims, task=objective, tokenizer=tokenizer, train_ds=train_ds,
                   valid_ds=valid_ds, resume=resume, load_from=load_from, ranks=ranks,
                   faults=faults, launchers=launchers)


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
        resumed = plan.resume.tag
        disagreement = agree_on_resume(plan.resume.ckpts, resumed and resumed.name,
                                       plan.ranks.log)
        if disagreement:  # the same on every rank; said once, by rank 0
            if plan.ranks.rank == 0:
                raise disagreement
            return disagreement.exit_code
        code = train_locked(plan)
    finally:
        lock.release()
    if code in (ExitCode.OK, ExitCode.INTERRUPTED, ExitCode.NONFINITE, ExitCode.SPIKES,
                ExitCode.HARDWARE):  # every rank together
        # Shut the process group down before the interpreter does: a rank that exited with
        # gloo's threads still running once died with "terminate called without an active
        # exception" (SIGABRT) after a complete run.
        dist.barrier()
        dist.destroy_process_group()
    return code


def build_setup(cfg: Config, dims: ParallelDims, task, source: str, ranks: RankInfo):
    """This rank's shard inside the DeepSpeed engine (engine.TrainingSetup), for a run whose
    state comes from `source` (a ResumePlan's). Every rank materializes only its shard of the
    meta-device skeleton, each parameter sliced from its full tensor made one at a time: from
    (seed, name), or read from an export."""
    from .engine import build_training

    torch.manual_seed(cfg.train.seed)  # the default stream: dropout, as in a single process
    model = model_skeleton(cfg.model)
    if source == INIT_FROM:
        weights = consolidated_weights(cfg.checkpoint.init_from)
        ranks.log(f"weights from {cfg.checkpoint.init_from} (fresh optimizer, step 0)")
    else:
        weights = InitWeights(model, cfg.model, cfg.train.seed)
    return build_training(model, cfg, dims, task, weights,
                          load_universal=source == UNIVERSAL_FORM)


def make_trainer(cfg: Config, task, setup, train_ds, valid_ds, ckpt_dir: str, state: TrainState,
                 ranks: RankInfo, faults: Optional[Faults] = None,
                 train_size: Optional[int] = None, launchers: Launchers = ()) -> Trainer:
    """The training loop around a built setup, with its metrics logger; it stops when one of
    `launchers` exits."""
    metrics = MetricsLogger(cfg.logging.run_dir, ranks.rank == 0, cfg.logging.tensorboard,
                            flops_per_token(cfg.model, cfg.model.max_seq_len), ranks.world_size,
                            device_peak_tflops(cfg.logging.peak_tflops, log=ranks.log),
                            layout=setup.par.dims.layout)
    extra = {"faults": faults} if faults is not None else {}
    return Trainer(cfg, task, setup, train_ds, valid_ds, metrics, ckpt_dir, state,
                   lambda s: {**s.client_state(), "train_samples": train_size,
                              **setup.checkpoint_info},
                   log=ranks.log, launchers=launchers, **extra)


def resume_state(plan: RunPlan, setup) -> Tuple[TrainState, dict]:
    """Load the resume checkpoint into the engine; -> the loop's state and the client state."""
    from ..compat.ds_universal import repair_zero3_universal_load
    from .engine import describe_param_groups, group_settings

    resume, cfg = plan.resume, plan.cfg
    state, client = load_train_state(setup.engine, plan.load_from)
    if resume.source == UNIVERSAL_FORM and cfg.train.zero_stage == 3:
        repair_zero3_universal_load(setup.engine, group_settings(cfg))
    plan.ranks.log(f"resumed from {resume.tag.label}: step {state.step}, "
                   f"{state.consumed_samples} samples consumed; optimizer groups: "
                   f"{describe_param_groups(setup.engine.optimizer)}")
    return state, client


def train_locked(plan: RunPlan) -> ExitCode:
    cfg, ranks = plan.cfg, plan.ranks
    if ranks.rank == 0:
        dump_config(cfg, os.path.join(cfg.logging.run_dir, "config.yaml"))
        save_run_tokenizer(cfg.logging.run_dir, plan.tokenizer)
    setup = build_setup(cfg, plan.dims, plan.task, plan.resume.source, ranks)
    if ranks.rank == 0:  # what DeepSpeed was really given: derived keys, defaults, deepspeed:
        atomic_write(os.path.join(cfg.logging.run_dir, DEEPSPEED_CONFIG),
                     json.dumps(setup.deepspeed_config, indent=2) + "\n")
    load_start = time.time()
    state, client = resume_state(plan, setup) if plan.load_from else (TrainState(), {})
    trainer = make_trainer(cfg, plan.task, setup, plan.train_ds, plan.valid_ds,
                           plan.resume.ckpts.path, state, ranks, plan.faults,
                           plan.resume.train_samples, plan.launchers)
    if plan.load_from:  # the steps replayed since the checkpoint follow this row in metrics
        trainer.metrics.resumed(state.step, plan.resume.tag.name, process_start_time(),
                                load_start)
        trainer.restore_tp_rng(client.get("_rng"))
        if manual_skip(cfg, plan.resume.tag.name):
            skip_data(trainer, manual_skip(cfg, plan.resume.tag.name),
                      f"checkpoint.resume_skip_batches={cfg.checkpoint.resume_skip_batches}")
    code = trainer.train()
    trainer.profile.close()  # a profile window the run ended inside of
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
