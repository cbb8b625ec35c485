"""What a checkpoint save costs the training loop: synchronous saves against checkpoint.async_save,
and DeepSpeed's own decoupled checkpoint engine, on the 92M-parameter GPT of
tools/bench_convert.py (d=768, 12 layers, TP2 on 2 CPU ranks: ~1.4 GB of checkpoint with the
Adam moments).

    python tools/bench_checkpoint.py [--steps 14] [--save-interval 4] [--skip-decoupled]

In one invocation, each a fresh `deepspeed --num_gpus 2 launch/pretrain_gpt.py` run of the same
steps and saves (numbers from its metrics.jsonl, rank 0):
1. synchronous saves: the time each save stops the loop (write, fsync, digests, marker);
2. checkpoint.async_save: the time each save stops the loop (the snapshot), the background
   write's time, and the step time while a background write is in progress (the steps after a
   save up to the one at whose end every rank's writer was found done) against the step time
   without one (the other steps after the first two);
3. DeepSpeed 0.19.8's decoupled engine (deepspeed.checkpoint.writer.decoupled, which the
   project's config refuses: its save_checkpoint returns before the files exist), driven
   directly on 2 ranks: its save_checkpoint time and the next step's time (the step waits for
   the writer process), beside a synchronous save in the same harness. It runs only without
   ZeRO here: under ZeRO-1/2 it dies on the first save (the ZeRO optimizer's state dict holds
   tensors that require grad, which torch.multiprocessing refuses to queue), so this part is
   the same model under ZeRO-0 with 2 data-parallel ranks.
The machine's load average is printed before and after: on a shared 2-core machine the step
times move with it. Last line: `blocking: X.XXx of a synchronous save` (median async stop
over median synchronous save).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench_convert import MODEL  # beside this file

from magneto_dist.launch_env import ROOT

RUN_MODEL = [a for a in MODEL if not a.startswith("train.train_iters=")]


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def train(run_dir: str, steps: int, interval: int, *extra: str) -> list:
    """One 2-rank run; -> its metrics.jsonl rows."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2",
           "launch/pretrain_gpt.py", *RUN_MODEL, f"train.train_iters={steps}",
           f"checkpoint.save_interval={interval}", "checkpoint.keep_last=1",
           "train.log_interval=1", f"logging.run_dir={run_dir}", *extra]
    print("run:", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def step_seconds(rows: list) -> dict:
    """step -> seconds of that step (train rows every step: its tokens over its tokens/s)."""
    return {r["step"]: 2 * 64 / r["tokens_per_s"] for r in rows if r["split"] == "train"}


def listed(saves: list) -> str:
    return ", ".join(f"{r['blocking_s']:.2f}" for r in saves)


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def sync_and_async(work: str, steps: int, interval: int) -> tuple:
    sync = train(os.path.join(work, "sync"), steps, interval)
    saves = [r for r in sync if r["split"] == "checkpoint"]
    sync_save = median(r["blocking_s"] for r in saves)
    print(f"synchronous save: median {sync_save:.2f} s of {len(saves)} ({listed(saves)})")
    rows = train(os.path.join(work, "async"), steps, interval, "checkpoint.async_save=true")
    saves = [r for r in rows if r["split"] == "checkpoint"]
    stop = median(r["blocking_s"] for r in saves)
    print(f"async save: the loop stopped median {stop:.2f} s of {len(saves)} "
          f"({listed(saves)}); background write median "
          f"{median(r['write_s'] for r in saves):.2f} s; host copy "
          f"{saves[0]['snapshot_bytes'] / 1e9:.2f} GB on rank 0; waits for a write "
          f"{saves[-1]['waits']}")
    seconds = step_seconds(rows)
    writing = {s for r in saves for s in range(r["step"] + 1, r["done_step"] + 1)}
    during = [t for s, t in seconds.items() if s in writing]
    without = [t for s, t in seconds.items() if s > 2 and s not in writing]
    sync_steps = [t for s, t in step_seconds(sync).items() if s > 2]
    ratio = median(during) / median(without)
    print(f"step time: {median(during):.3f} s during a background write ({len(during)} "
          f"steps), {median(without):.3f} s without ({len(without)} steps): x{ratio:.2f}; "
          f"synchronous run {median(sync_steps):.3f} s")
    peak = [max(r["memory_gb"] for r in run if r["split"] == "train") for run in (sync, rows)]
    print(f"peak RSS of rank 0: {peak[0]:.2f} GB synchronous, {peak[1]:.2f} GB async")
    return sync_save, stop


def decoupled(work: str) -> None:
    """DeepSpeed's decoupled engine against a synchronous save, in this file's worker mode."""
    for mode in ("sync", "decoupled"):
        out = os.path.join(work, f"{mode}.json")
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2",
               os.path.abspath(__file__), "--worker", mode, "--out", out,
               "--save-dir", os.path.join(work, f"ds_{mode}")]
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if proc.returncode:
            print(f"DeepSpeed {mode} engine: failed ({proc.stdout.strip().splitlines()[-1]})")
            continue
        with open(out, encoding="utf-8") as f:
            r = json.load(f)
        print(f"DeepSpeed {mode} engine (ZeRO-0, DP2): save_checkpoint {r['save']:.2f} s, the "
              f"next step {r['next_step']:.2f} s against {r['step']:.2f} s")


def worker(mode: str, out: str, save_dir: str) -> None:
    """One rank of the decoupled-engine harness: the 92M GPT under ZeRO-0, 6 steps, saves
    after steps 2 and 4; rank 0 writes the medians to `out`."""
    import deepspeed
    import torch

    from magneto_dist.compat.ds_engine import disable_cpu_shm_comm
    from magneto_dist.config import load_config
    from magneto_dist.model import build_model

    disable_cpu_shm_comm()
    deepspeed.init_distributed("gloo")
    os.environ.setdefault("CROSS_SIZE", "1")  # the decoupled writer reads the launcher's
    os.environ.setdefault("CROSS_RANK", "0")  # machine count
    cfg = load_config(None, [a for a in RUN_MODEL if a.startswith("model.")])
    model = build_model(cfg.model, seed=1)
    config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1,
              "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9}
    if mode == "decoupled":
        config["checkpoint"] = {"writer": {"type": "python", "decoupled": True,
                                           "data_parallel": "replica"}}
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4))
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 64))
    steps, saves, after = [], [], []
    for step in range(1, 7):
        start = time.perf_counter()
        loss = engine(tokens).float().logsumexp(-1).mean()
        engine.backward(loss)
        engine.step()
        (after if step in (3, 5) else steps).append(time.perf_counter() - start)
        if step in (2, 4):
            start = time.perf_counter()
            engine.save_checkpoint(save_dir, tag=f"global_step{step}", save_latest=False)
            saves.append(time.perf_counter() - start)
    engine.destroy()  # the decoupled writer finishes and exits
    if torch.distributed.get_rank() == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"save": median(saves), "next_step": median(after),
                       "step": median(steps[2:])}, f)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--save-interval", type=int, default=4)
    p.add_argument("--skip-decoupled", action="store_true")
    p.add_argument("--worker", choices=("sync", "decoupled"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--save-dir", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.out, args.save_dir)
        return 0
    print(load(), flush=True)
    with tempfile.TemporaryDirectory() as work:
        sync_save, stop = sync_and_async(work, args.steps, args.save_interval)
        if not args.skip_decoupled:
            decoupled(work)
    print(load())
    print(f"blocking: {stop / sync_save:.2f}x of a synchronous save")
    return 0


if __name__ == "__main__":
    sys.exit(main())
