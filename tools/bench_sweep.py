"""The stability sweep's overhead over the same cells run by hand, and the time from a cell's
end to its row in results.jsonl.

    python tools/bench_sweep.py [--jobs 1] [--rounds 2] [grid.depths=[6] grid.steps=100 ...]

Reference: the cells' own commands (launch/pretrain_gpt.py with each cell's overrides, as
tools/stability_sweep.py would give them) run by hand, --jobs at a time. Then the same cells as
a local pool and as submitit local jobs (--cluster local), each into a fresh output directory
with the data caches already built; wall time and CPU time (of every process, which the other
work on a shared machine does not inflate) as ratios to the reference. The row latency is
results.jsonl's recorded_at minus the cell's ended_at (when its trainer exited), over the
cluster run's rows.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from magneto_dist.launch_env import ROOT
from magneto_dist.stability.grid import load_sweep
from magneto_dist.stability.sweep import prepare_data

CONFIG = "configs/stability/depth_lr_cpu.yaml"
GRID = ["grid.schemes=[pre_ln,magneto]", "grid.depths=[6]", "grid.lrs=[1e-3,5e-3]",
        "grid.steps=100", "grid.diagnostics_interval=50", "train.eval_interval=50"]


def children_cpu() -> float:
    """User + system CPU seconds of every finished process started from here (the sweep's
    cells, its submitit controllers and jobs included: each is waited for by its parent).
    Unlike wall time, it does not grow with the other work on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def by_hand(commands, jobs: int) -> float:
    """The cells' commands, `jobs` at a time, as a person would start them; -> wall seconds."""
    start, waiting, running = time.monotonic(), list(commands), []
    while waiting or running:
        while waiting and len(running) < jobs:
            running.append(subprocess.Popen(waiting.pop(0), cwd=ROOT, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.STDOUT,
                                            env=dict(os.environ, OMP_NUM_THREADS="1")))
        time.sleep(0.2)
        for proc in [p for p in running if p.poll() is not None]:
            assert proc.returncode == 0, f"a cell by hand exited {proc.returncode}"
            running.remove(proc)
    return time.monotonic() - start


def sweep(out: str, jobs: int, extra, overrides) -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "tools/stability_sweep.py", "--config", CONFIG, "--out", out,
                    "--jobs", str(jobs), *extra, *overrides], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return time.monotonic() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("overrides", nargs="*", help=f"grid and trainer keys (default {GRID})")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        overrides = [f"data.cache_dir={os.path.join(work, 'cache')}", *(args.overrides or GRID)]
        hand_sweep = load_sweep(CONFIG, overrides, os.path.join(work, "hand"))
        commands = [[sys.executable, "launch/pretrain_gpt.py", *hand_sweep.cell_overrides(c)]
                    for c in hand_sweep.cells()]
        prepare_data(hand_sweep, log=lambda *a: None)  # caches built: no timed run pays it
        print(f"{len(commands)} cells, {args.jobs} at a time, {args.rounds} round(s); "
              f"{' '.join(overrides[1:])}")
        runs = {"cells by hand (reference)": lambda r: by_hand(commands, args.jobs),
                "local pool": lambda r: sweep(os.path.join(work, f"pool{r}"), args.jobs, [],
                                              overrides),
                "--cluster local (submitit)": lambda r: sweep(
                    os.path.join(work, f"local{r}"), args.jobs, ["--cluster", "local"],
                    overrides)}
        walls = {name: [] for name in runs}
        cpus = {name: [] for name in runs}
        latency = []
        for r in range(args.rounds):  # the order alternates, so drift in the load hits all
            for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
                before = children_cpu()
                walls[name].append(runs[name](r))
                cpus[name].append(children_cpu() - before)
            with open(os.path.join(work, f"local{r}", "results.jsonl"), encoding="utf-8") as f:
                latency += [json.loads(line)["recorded_at"] - json.loads(line)["ended_at"]
                            for line in f]
    hand = statistics.mean(walls["cells by hand (reference)"])
    hand_cpu = statistics.mean(cpus["cells by hand (reference)"])
    print(f"{'run':<30}{'wall s':>8}{'vs hand':>9}{'CPU s':>8}{'vs hand':>9}")
    for name, values in walls.items():
        wall, cpu = statistics.mean(values), statistics.mean(cpus[name])
        print(f"{name:<30}{wall:>8.1f}{wall / hand:>9.3f}{cpu:>8.1f}{cpu / hand_cpu:>9.3f}")
    print(f"cell end to its row in results.jsonl (--cluster local, {len(latency)} cells): "
          f"median {statistics.median(latency):.2f} s, max {max(latency):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
