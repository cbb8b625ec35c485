"""Recovery under launch/ft_launch.py: from a kill -9 to the first step after the restart,
broken down, beside the same run's step time (the reference: what a step costs).

    python tools/bench_recovery.py [--nproc 1] [--kill-step 23] [--rounds 3] [overrides ...]
    python tools/bench_recovery.py --lose-node [--rdzv-conf keep_alive_interval=1,...]

Runs the default job (configs/gpt_tiny_cpu.yaml, or --config) under the launcher with its
default settings, and reads the times from the files the run writes. By default rank 0 is
killed at --kill-step through the fault hook (SIGKILL, once): the fault's marker (the kill),
restarts.jsonl (the agent noticed), metrics.jsonl's resume row (the new process's start and
its checkpoint load) and the first step after it. With --lose-node two launchers ("nodes",
--nnodes 1:2, a rendezvous store of their own) train together and the one without rank 0 is
killed with all its ranks at --kill-step: the survivor's failure row (its ranks lost their
peers), its "node lost" row (the rendezvous re-formed without the dead node: its keep-alive
expired, then the last call) and the same resume phases, the layout change's universal
conversion included. Medians over --rounds runs.
"""
import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from magneto_dist.launch_env import ROOT
from magneto_dist.resilience.parent_watch import parent_of


PHASES = ["detection", "re-rendezvous and spawn", "process start-up", "checkpoint load",
          "first step", "kill to first step"]
NODE_LOSS_PHASES = ["peers' failure seen", "re-formed without the node", "spawn",
                    "process start-up", "checkpoint load (universal)", "first step",
                    "kill to first step"]


def rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def training(args, run_dir: str):
    return ["launch/pretrain_gpt.py", *(["--config", args.config] if args.config else []),
            f"logging.run_dir={run_dir}", f"train.train_iters={args.kill_step + 5}",
            "checkpoint.save_interval=10", "train.log_interval=1", "train.eval_interval=0",
            "logging.sample_prompt=", "logging.tensorboard=false", *args.overrides]


def resume_phases(metrics, since: float) -> dict:
    """The resumed attempt's phases from its resume row (the first after `since`)."""
    at = next(i for i, r in enumerate(metrics) if r["split"] == "resume" and r["time"] > since)
    resume, first = metrics[at], next(r for r in metrics[at:] if r["split"] == "train")
    before = [r["time"] for r in metrics[:at] if r["split"] == "train"]
    return {"resume": resume, "first": first,
            "step": statistics.median(b - a for a, b in zip(before, before[1:]))}


def one_round(args, work: str) -> dict:
    run_dir, once = os.path.join(work, "run"), os.path.join(work, "once")
    cmd = [sys.executable, "launch/ft_launch.py", "--nproc-per-node", str(args.nproc),
           *training(args, run_dir)]
    env = dict(os.environ, MAGNETO_DIST_FAULT=f"kill_at_step:0:{args.kill_step}",
               MAGNETO_DIST_FAULT_ONCE_DIR=once)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    killed = os.path.getmtime(os.path.join(once, f"kill_at_step-0-{args.kill_step}"))
    (incident,) = rows(os.path.join(run_dir, "restarts.jsonl"))
    phases = resume_phases(rows(os.path.join(run_dir, "metrics.jsonl")), killed)
    resume, first = phases["resume"], phases["first"]
    return {"detection": incident["time"] - killed,
            "re-rendezvous and spawn": resume["process_start"] - incident["time"],
            "process start-up": resume["load_start"] - resume["process_start"],
            "checkpoint load": resume["time"] - resume["load_start"],
            "first step": first["time"] - resume["time"],
            "kill to first step": first["time"] - killed, "step": phases["step"]}


def launcher(args, run_dir: str, port: int) -> subprocess.Popen:
    conf = ",".join(filter(None, ["is_host=false", args.rdzv_conf]))
    cmd = [sys.executable, "launch/ft_launch.py", "--nproc-per-node", str(args.nproc),
           "--nnodes", "1:2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-conf", conf,
           *training(args, run_dir)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and everything in its session (a node's loss); its ranks, in
    sessions of their own, die with it (PR_SET_PDEATHSIG)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_for_step(run_dir: str, step: int, procs) -> None:
    path = os.path.join(run_dir, "metrics.jsonl")
    while not (os.path.exists(path) and any(r["split"] == "train" and r["step"] >= step
                                            for r in rows(path))):
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a launcher exited before the kill step; run it by hand to see")
        time.sleep(0.05)


def node_loss_round(args, work: str) -> dict:
    run_dir = os.path.join(work, "run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = subprocess.Popen([sys.executable, "tools/rdzv_store.py", "--port", str(port)],
                             cwd=ROOT, stdout=subprocess.DEVNULL, start_new_session=True)
    nodes = []
    try:
        nodes = [launcher(args, run_dir, port) for _ in range(2)]
        wait_for_step(run_dir, args.kill_step, nodes)
        with open(os.path.join(run_dir, "run.lock"), encoding="utf-8") as f:
            rank0_parent = parent_of(json.load(f)["pid"])  # the lock names rank 0's pid
        survivor, lost = sorted(nodes, key=lambda p: p.pid != rank0_parent)
        killed = time.time()
        stop(lost)
        if survivor.wait() != 0:
            raise RuntimeError("the surviving launcher failed; run it by hand to see")
    finally:
        for proc in [*nodes, store]:
            stop(proc)
    incidents = rows(os.path.join(run_dir, "restarts.jsonl"))
    failed = next(r for r in incidents if r["cause"] != "node lost")
    lost = next(r for r in incidents if r["cause"] == "node lost")
    phases = resume_phases(rows(os.path.join(run_dir, "metrics.jsonl")), killed)
    resume, first = phases["resume"], phases["first"]
    return {"peers' failure seen": failed["time"] - killed,
            "re-formed without the node": lost["time"] - failed["time"],
            "spawn": resume["process_start"] - lost["time"],
            "process start-up": resume["load_start"] - resume["process_start"],
            "checkpoint load (universal)": resume["time"] - resume["load_start"],
            "first step": first["time"] - resume["time"],
            "kill to first step": first["time"] - killed, "step": phases["step"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=1, help="ranks (default 1: the default job)")
    p.add_argument("--kill-step", type=int, default=23, help="rank 0 is killed at this step")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--config", default=None)
    p.add_argument("--lose-node", action="store_true",
                   help="two launchers of --nproc ranks; the one without rank 0 is killed")
    p.add_argument("--rdzv-conf", default="",
                   help="with --lose-node: rendezvous settings over the launcher's defaults")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    measure, phases = (node_loss_round, NODE_LOSS_PHASES) if args.lose_node else \
        (one_round, PHASES)
    results = []
    for round_index in range(args.rounds):
        with tempfile.TemporaryDirectory() as work:
            results.append(measure(args, work))
        print(f"round {round_index + 1}: kill to first step "
              f"{results[-1]['kill to first step']:.2f} s", flush=True)
    step = statistics.median(r["step"] for r in results)
    print(f"step time (reference): {step * 1000:.0f} ms")
    for phase in phases:
        seconds = statistics.median(r[phase] for r in results)
        print(f"{phase:26s} {seconds:6.2f} s  = {seconds / step:7.1f} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
