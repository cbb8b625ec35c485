"""Recovery under launch/ft_launch.py: from a rank's kill -9 to the first step after the
restart, broken down, beside the same run's step time (the reference: what a step costs).

    python tools/bench_recovery.py [--nproc 1] [--kill-step 23] [--rounds 3] [overrides ...]

Runs the default job (configs/gpt_tiny_cpu.yaml, or --config) under the launcher with its
default settings, kills rank 0 at --kill-step through the fault hook (SIGKILL, once), and reads
the times from the files the run writes: the fault's marker (the kill), restarts.jsonl (the
agent noticed), and metrics.jsonl's resume row (the new process's start and its checkpoint
load) and first step after it. Medians over --rounds runs.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout

PHASES = ["detection", "re-rendezvous and spawn", "process start-up", "checkpoint load",
          "first step", "kill to first step"]


def rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def one_round(args, work: str) -> dict:
    run_dir, once = os.path.join(work, "run"), os.path.join(work, "once")
    cmd = [sys.executable, "launch/ft_launch.py", "--nproc-per-node", str(args.nproc),
           "launch/pretrain_gpt.py", *(["--config", args.config] if args.config else []),
           f"logging.run_dir={run_dir}", f"train.train_iters={args.kill_step + 5}",
           "checkpoint.save_interval=10", "train.log_interval=1", "train.eval_interval=0",
           "logging.sample_prompt=", "logging.tensorboard=false", *args.overrides]
    env = dict(os.environ, MAGNETO_DIST_FAULT=f"kill_at_step:0:{args.kill_step}",
               MAGNETO_DIST_FAULT_ONCE_DIR=once)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    killed = os.path.getmtime(os.path.join(once, f"kill_at_step-0-{args.kill_step}"))
    (incident,) = rows(os.path.join(run_dir, "restarts.jsonl"))
    metrics = rows(os.path.join(run_dir, "metrics.jsonl"))
    at = next(i for i, r in enumerate(metrics) if r["split"] == "resume")
    resume, first = metrics[at], next(r for r in metrics[at:] if r["split"] == "train")
    before = [r["time"] for r in metrics[:at] if r["split"] == "train"]
    return {"detection": incident["time"] - killed,
            "re-rendezvous and spawn": resume["process_start"] - incident["time"],
            "process start-up": resume["load_start"] - resume["process_start"],
            "checkpoint load": resume["time"] - resume["load_start"],
            "first step": first["time"] - resume["time"],
            "kill to first step": first["time"] - killed,
            "step": statistics.median(b - a for a, b in zip(before, before[1:]))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=1, help="ranks (default 1: the default job)")
    p.add_argument("--kill-step", type=int, default=23, help="rank 0 is killed at this step")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--config", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    results = []
    for round_index in range(args.rounds):
        with tempfile.TemporaryDirectory() as work:
            results.append(one_round(args, work))
        print(f"round {round_index + 1}: kill to first step "
              f"{results[-1]['kill to first step']:.2f} s", flush=True)
    step = statistics.median(r["step"] for r in results)
    print(f"step time (reference): {step * 1000:.0f} ms")
    for phase in PHASES:
        seconds = statistics.median(r[phase] for r in results)
        print(f"{phase:26s} {seconds:6.2f} s  = {seconds / step:7.1f} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
