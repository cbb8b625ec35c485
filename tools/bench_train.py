"""Whole-stack throughput: the real trainer's steady-state optimizer steps against a plain
PyTorch loop over the same model and batch, in one process, interleaved.

    python tools/bench_train.py [--config configs/gpt_tiny_cpu.yaml] [--rounds 5] [overrides]

The trainer is the one `launch/pretrain_gpt.py` runs (training/run.py's build_setup and
make_trainer): the data loader over the built-in corpus (or the config's data), the DeepSpeed
engine with its ZeRO stage, the per-step grad norm, non-finite check, metrics logging and the
agreed stop. Evaluation and checkpoint saves are switched off: they are not steady-state steps.
The reference is a plain loop on the same weights (the same name-keyed init) and one fixed
global batch: forward and backward per micro-batch, clipping, AdamW and the LR schedule. Rounds
alternate (plain then trainer, trainer then plain, ...) and medians are compared, so this
machine's noise hits both alike. On a GPU it also prints TFLOP/s and MFU (logging.peak_tflops or the known-GPU
table). The table ends with `overhead: X.XXXx` (trainer step time over plain step time); with
train.compile=blocks the trainer's blocks are compiled (during its warm-up steps, whose compile
time is printed) and the plain loop stays eager. With train.replica_check_interval=N the check
alone is timed as a third loop, and a line after that one gives its cost against the trainer's
step (pass a large N to keep it out of the trainer's own steps).

The straggler check (logging.straggler_interval) needs peers, so its cost is measured on two
ranks or more, where a third loop runs the same trainer with the check switched off:

    deepspeed --num_gpus 2 tools/bench_train.py --steps 50 --rounds 6

prints `straggler check: X.XXXx` (the trainer's step time with the check over without it; with
--steps a multiple of the interval, each timed round of the trainer holds its share of the
check's gathers). With several ranks the plain loop runs each rank's own micro-batches, without
communication, and rank 0 prints.
"""
import argparse
import os
import shutil
import statistics
import tempfile

import torch

from magneto_dist.config import load_config, validate, with_vocab_size
from magneto_dist.model import build_model, flops_per_token
from magneto_dist.parallel import state
from magneto_dist.training.engine import optimizer_param_groups
from magneto_dist.training.loop import TrainState
from magneto_dist.training.metrics import device_peak_tflops
from magneto_dist.data.setup import load_tokenizer, prepare_data
from magneto_dist.launch_env import RankInfo, default_config, set_cpu_threads, single_process_env
from magneto_dist.checkpoint.resume import FRESH
from magneto_dist.training.run import TASKS, build_setup, make_trainer
from magneto_dist.training.stragglers import NO_CHECK
from magneto_dist.training.schedule import make_scheduler

from bench_model import time_round  # beside this file

NO_CHECK_LOOP = "no straggler check"  # the trainer's loop with logging.straggler_interval=0
REPLICA_CHECK = "replica check"


def plain_loop(cfg, task, device, batches):
    """The reference: the same model and optimizer settings in plain PyTorch (torch's AdamW
    over the trainer's parameter groups), no engine, no loader. A bf16 run is compared with
    PyTorch's own mixed precision: fp32 weights, the forward under bf16 autocast."""
    model = build_model(cfg.model, seed=cfg.train.seed).to(device)
    t = cfg.train
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, cfg), lr=t.lr,
                                  betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                  fused=device.type == "cuda")
    scheduler = make_scheduler(optimizer, cfg.train)
    bf16 = t.precision == "bf16"

    def step():
        for batch in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = task.loss(task.forward(model, batch), batch) / len(batches)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def build_trainer(config: str, overrides, steps: int, run_dir: str):
    """The trainer `launch/pretrain_gpt.py` runs (training/run.py's build_setup and
    make_trainer) for `steps` optimizer steps with evaluation and saves off, in this process's
    rank of the launcher's world (a world of one without a launcher). Returns the config, its
    ParallelDims, the task, the trainer (started) and its data iterator."""
    # saves off: an interval past the last step (train.replica_check_interval and
    # spike_policy=rollback refuse 0, having no checkpoint to roll back to)
    cfg = load_config(config, [*overrides, f"train.train_iters={steps + 1}",
                               "train.eval_interval=0", f"checkpoint.save_interval={steps + 2}",
                               f"logging.run_dir={run_dir}", "logging.tensorboard=true"])
    single_process_env()
    ranks = RankInfo()
    dims = validate(cfg, ranks.world_size, torch.cuda.is_available())
    set_cpu_threads(ranks)  # as the run does
    tokenizer, prefixes = load_tokenizer(cfg, ranks)
    cfg = with_vocab_size(cfg, tokenizer.vocab_size)  # as the run does (training/run.py)
    train_ds, _, _ = prepare_data(cfg, "gpt", tokenizer, prefixes, ranks)
    task = TASKS["gpt"].for_run(cfg, dims, tokenizer.vocab_size, tokenizer.eod)
    if torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank)
    state.init_distributed()
    setup = build_setup(cfg, dims, task, FRESH, ranks)
    trainer = make_trainer(cfg, task, setup, train_ds, None, os.path.join(run_dir, "ckpt"),
                           TrainState(), ranks)
    data = trainer.loader(train_ds, (steps + 1) * cfg.train.global_batch_size, 0)
    trainer.start()
    return cfg, dims, task, trainer, data


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=default_config("gpt"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each loop first")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args()
    # the trainer's loops (with and without the straggler check) both draw from its data
    steps = 2 * (args.warmup + args.rounds * args.steps)
    run_dir = tempfile.mkdtemp(prefix="bench_train-")
    cfg, dims, task, trainer, data = build_trainer(args.config, args.overrides, steps, run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # the plain loop repeats the first global batch; the trainer goes on through the data
    fixed = [{k: v.to(device) for k, v in next(data).items()} for _ in range(dims.grad_accum)]
    check, checks = trainer.stragglers, []  # the steps at which the check gathered

    def with_check():
        trainer.step(data)
        if check is not NO_CHECK and trainer.state.step % check.interval == 0:
            checks.append(trainer.state.step)

    def without_check():
        trainer.stragglers = NO_CHECK
        trainer.step(data)
        trainer.stragglers = check

    loops = {"plain PyTorch": plain_loop(cfg, task, device, fixed), "trainer": with_check}
    if check is not NO_CHECK:
        loops[NO_CHECK_LOOP] = without_check
    replicas = trainer.healer and trainer.healer.replicas
    if replicas:  # train.replica_check_interval: the check alone, timed beside the step
        loops[REPLICA_CHECK] = replicas.check
    times = {name: [] for name in loops}
    for name, step in loops.items():
        time_round(step, args.warmup, device)  # train.compile=blocks compiles here
    compile_seconds, checks[:] = trainer.compile_seconds(), []
    for round_ in range(args.rounds):  # A B, then B A: neither always runs first
        for name, step in list(loops.items())[::1 if round_ % 2 == 0 else -1]:
            times[name].append(time_round(step, args.steps, device))
    trainer.metrics.close()
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics and TensorBoard of the timed steps
    replica_seconds = times.pop(REPLICA_CHECK, None)
    if torch.distributed.get_rank() == 0:
        report(cfg, device, times, compile_seconds, checks, args.steps)
        if replica_seconds:
            report_replica_check(cfg, statistics.median(replica_seconds),
                                 statistics.median(times["trainer"]))


def report_replica_check(cfg, check: float, step: float) -> None:
    """The replica check's cost: one check against the trainer's step (which makes one every
    train.replica_check_interval steps; at 1 the trainer's own step includes it)."""
    interval = cfg.train.replica_check_interval
    print(f"replica check: {check * 1e3:.1f} ms each, {check / step:.3f}x a trainer step; "
          f"per step at train.replica_check_interval={interval}: {check / step / interval:.2%}")


def report(cfg, device, times, compile_seconds=None, checks=(), steps_per_round=0) -> None:
    t = cfg.train
    tokens = t.global_batch_size * cfg.model.max_seq_len
    flops = flops_per_token(cfg.model, cfg.model.max_seq_len) * tokens
    peak = device_peak_tflops(cfg.logging.peak_tflops) if device.type == "cuda" else None
    print(f"device={device} threads={torch.get_num_threads()} precision={t.precision} "
          f"ZeRO-{t.zero_stage} global batch={t.global_batch_size} x {cfg.model.max_seq_len} "
          f"tokens; medians of {len(times['trainer'])} rounds")
    print(f"{'loop':<20}{'step ms':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'vs plain':>10}")
    reference = statistics.median(times["plain PyTorch"])
    for name, samples in times.items():
        m = statistics.median(samples)
        mfu = f"{flops / m / 1e12 / peak:.1%}" if peak else "-"
        print(f"{name:<20}{m * 1e3:>10.1f}{tokens / m:>12,.0f}{flops / m / 1e12:>10.2f}"
              f"{mfu:>8}{m / reference:>10.3f}")
    if compile_seconds is not None:
        print(f"compile: {compile_seconds:.1f} s (train.compile={t.compile}, in the warm-up "
              "steps, not timed)")
    if NO_CHECK_LOOP in times:
        timed = len(times["trainer"]) * steps_per_round
        print(f"straggler check every {cfg.logging.straggler_interval} steps: {len(checks)} "
              f"gathers in the trainer's {timed} timed steps")
        ratio = statistics.median(times["trainer"]) / statistics.median(times[NO_CHECK_LOOP])
        print(f"straggler check: {ratio:.3f}x")
    print(f"overhead: {statistics.median(times['trainer']) / reference:.3f}x")


if __name__ == "__main__":
    main()
