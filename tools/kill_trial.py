"""A random kill -9 trial under launch/ft_launch.py: the run must end with the losses of an
uninterrupted run, bit for bit, and no checkpoint marked complete may be damaged.

    python tools/kill_trial.py [--kills 20] [--nproc 2] [--seed 0] [--steps N] [overrides ...]

First the uninterrupted reference (the same command, 1 launcher, no kills), then the trial: the
same run under the launcher while this script sends SIGKILL to a random training process at a
random moment (start-up, mid-step, mid-save, during the resume: whatever the moment hits) each
time the run has made progress since the last kill, --kills times. It compares every step's loss
(the last row of each step: rows after a resume replay steps) and verifies every complete-marked
tag's recorded sizes and content digests. Last line: `trial: PASS` or `trial: FAIL (why)`.
Unlike the injected faults of tests/dist/test_ft_launch.py, the kills come from outside at
times the run does not choose, as a node's OOM killer or a preemption would.
"""
import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from magneto_dist.checkpoint.tags import CheckpointDir
from magneto_dist.launch_env import ROOT
from magneto_dist.training.metrics_file import last_per_step, read_metrics

COMMON = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4",
          "model.ffn_hidden_size=256", "model.max_seq_len=32",
          "train.micro_batch_size=2", "train.global_batch_size=8", "checkpoint.save_interval=2",
          "checkpoint.keep_last=3", "train.eval_interval=10", "train.log_interval=1"]


def launch(run_dir, nproc, steps, overrides, max_restarts):
    cmd = [sys.executable, "launch/ft_launch.py", "--nproc-per-node", str(nproc),
           "--max-restarts", str(max_restarts), "--monitor-interval", "0.5",
           "launch/pretrain_gpt.py", *COMMON, f"train.train_iters={steps}",
           f"logging.run_dir={run_dir}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(f"{run_dir}.log", "w") as log:  # a file, not a pipe nobody reads until the end
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def tail(path, chars=3000):
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def training_pids(run_dir):
    """The run's rank processes: pretrain_gpt.py with this run dir on its command line."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        text = b" ".join(args).decode(errors="replace")
        if "pretrain_gpt.py" in text and f"logging.run_dir={run_dir}" in text \
                and "ft_launch.py" not in text:
            pids.append(int(entry))
    return pids


def rows_so_far(run_dir):
    try:
        return len(read_metrics(run_dir))
    except OSError:
        return 0


def kill_randomly(proc, run_dir, kills, rng, log):
    """SIGKILL a random rank at a random moment, --kills times; -> kills sent. Most kills wait
    for a new metrics row since the last kill (so the run progresses: a step, an evaluation or
    a save is under way when it lands); one in four lands in the restarted processes' start-up
    (imports, rendezvous, data, the checkpoint load) instead."""
    sent, seen, killed_from = 0, 0, set()
    while proc.poll() is None and sent < kills:
        in_start_up = sent % 4 == 3
        pids = [pid for pid in training_pids(run_dir) if pid not in killed_from]
        if not pids or (not in_start_up and rows_so_far(run_dir) <= seen):
            time.sleep(0.2)
            continue
        time.sleep(rng.uniform(0.0, 2.0 if in_start_up else 1.0))
        pids = [pid for pid in training_pids(run_dir) if pid not in killed_from]
        if not pids or proc.poll() is not None:
            continue
        victim = rng.choice(pids)
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            continue
        sent, seen, killed_from = sent + 1, rows_so_far(run_dir), set(pids)
        log(f"kill {sent}/{kills}: pid {victim} ({'start-up' if in_start_up else 'running'}), "
            f"{seen} metrics rows so far")
    return sent


def damaged_tags(ckpts):
    return {tag: problem for tag in ckpts.complete_tags()
            for problem in [ckpts.tag(tag).damage()] if problem}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="of the kill times and victims")
    p.add_argument("--steps", type=int, default=None,
                   help="train.train_iters (default: 4 per kill, at least 40)")
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("overrides", nargs="*", help="run config overrides (key=value)")
    args = p.parse_args()
    steps = args.steps or max(40, 4 * args.kills)
    log = lambda msg: print(f"[kill_trial] {msg}", flush=True)  # noqa: E731
    work = tempfile.mkdtemp(prefix="kill_trial_")
    reference, trial = os.path.join(work, "reference"), os.path.join(work, "trial")

    log(f"reference run in {reference}")
    ref = launch(reference, args.nproc, steps, args.overrides, max_restarts=0)
    if ref.wait() != 0:
        print(tail(f"{reference}.log"))
        sys.exit(f"trial: FAIL (the reference run exited {ref.returncode})")
    log(f"trial run in {trial}: {args.kills} kills")
    started = time.monotonic()
    proc = launch(trial, args.nproc, steps, args.overrides, max_restarts=args.kills + 5)
    sent = kill_randomly(proc, trial, args.kills, random.Random(args.seed), log)
    proc.wait()
    log(f"trial ended with exit {proc.returncode} after {time.monotonic() - started:.0f} s "
        f"and {sent} kills")

    expected = {r["step"]: r["loss"] for r in last_per_step(read_metrics(reference), "train")}
    got = {r["step"]: r["loss"] for r in last_per_step(read_metrics(trial), "train")}
    differing = [step for step in expected if got.get(step) != expected[step]]
    ckpts = CheckpointDir.of_run(trial)
    damaged = damaged_tags(ckpts)
    log(f"{len(expected)} steps compared, {len(differing)} differ; "
        f"{len(ckpts.complete_tags())} complete tags verified, "
        f"{len(damaged)} damaged")
    problems = ([f"exit {proc.returncode}"] if proc.returncode != 0 else []) \
        + ([f"only {sent} of {args.kills} kills landed"] if sent < args.kills else []) \
        + ([f"losses differ at steps {differing}"] if differing else []) \
        + ([f"damaged complete tags {damaged}"] if damaged else [])
    if problems:
        print(tail(f"{trial}.log"))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print("trial: PASS" if not problems else f"trial: FAIL ({'; '.join(problems)})")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
