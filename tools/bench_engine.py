"""Overhead of the DeepSpeed engine against a plain PyTorch training loop, same model and batch.

    python tools/bench_engine.py [--config configs/gpt_tiny_cpu.yaml] [--zero-stage 1] [--rounds 5]

Both loops do forward, backward, gradient clipping and an AdamW step on identical copies of the
model from the config, on one process; they are timed in interleaved rounds (A B A B ...) and
the medians compared, so machine noise hits both alike. The reference is the plain loop.
"""
import argparse
import os
import statistics
import time

import torch

from magneto_dist.config import load_config
from magneto_dist.model import build_model
from magneto_dist.training.engine import build_engine, build_optimizer
from magneto_dist.training.run import ROOT, single_process_env
from magneto_dist.training.schedule import make_scheduler
from magneto_dist.training.tasks import GPTTask


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "gpt_tiny_cpu.yaml"))
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per round")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, [*args.overrides, f"train.zero_stage={args.zero_stage}"])
    cfg.model.vocab_size = cfg.data.builtin_vocab_size
    single_process_env()
    import deepspeed
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = GPTTask(cfg.model.vocab_size)
    t = cfg.train
    accum = t.global_batch_size // t.micro_batch_size
    tokens = torch.randint(0, cfg.model.vocab_size,
                           (accum, t.micro_batch_size, cfg.model.max_seq_len + 1), device=device)
    batches = [{"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones_like(x[:, 1:])}
               for x in tokens]

    torch.manual_seed(0)
    plain = build_model(cfg.model).to(device)
    optimizer = build_optimizer(plain, cfg)
    scheduler = make_scheduler(optimizer, t)

    def plain_step():
        for batch in batches:
            (task.loss(plain(batch["tokens"]), batch) / accum).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), t.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    engine = build_engine(build_model(cfg.model).to(device), cfg, dp_size=1)

    def engine_step():
        for batch in batches:
            engine.backward(task.loss(engine(batch["tokens"]), batch))
            engine.step()

    loops = {"plain PyTorch": plain_step, f"DeepSpeed ZeRO-{args.zero_stage}": engine_step}
    times = {name: [] for name in loops}
    for step in loops.values():
        step()  # warm-up
    for _ in range(args.rounds):
        for name, step in loops.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / args.steps)
    n_tokens = t.global_batch_size * cfg.model.max_seq_len
    ref = statistics.median(times["plain PyTorch"])
    print(f"device={device} threads={torch.get_num_threads()} global batch={t.global_batch_size}"
          f" x {cfg.model.max_seq_len} tokens")
    print(f"{'loop':<20}{'tokens/s':>12}{'time vs plain':>16}")
    for name in loops:
        m = statistics.median(times[name])
        print(f"{name:<20}{n_tokens / m:>12,.0f}{m / ref:>16.3f}")


if __name__ == "__main__":
    main()
