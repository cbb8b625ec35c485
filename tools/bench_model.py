"""Forward+backward throughput of each norm scheme side by side, as ratios to Pre-LN.

    python tools/bench_model.py --hidden-size 256 --num-layers 6 --seq-len 128 --batch-size 8

The schemes are timed in interleaved rounds (A B C ... A B C ...) and each reports its median, so
a burst of noise on this shared machine hits every scheme alike; the ratio against the reference
(pre_ln by default) is the number to quote, not the absolute tokens/s.
"""
from __future__ import annotations

import argparse
import statistics
import time


import torch
import torch.nn.functional as F

from magneto_dist.model import ModelConfig, build_model, flops_per_token
from magneto_dist.model.spec import SCHEMES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--schemes", nargs="+", default=["pre_ln", "magneto", "post_ln", "deepnorm",
                                                     "normformer", "lns"], choices=sorted(SCHEMES))
    p.add_argument("--reference", default="pre_ln", help="scheme the ratios are taken against")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--norm-type", default="layernorm", choices=["layernorm", "rmsnorm"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="bf16 is for GPUs: this CPU's bf16 matmul is pathologically slow")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per scheme")
    p.add_argument("--steps", type=int, default=3, help="fwd+bwd steps per round")
    return p.parse_args(argv)


def make_step(args, scheme, device, dtype):
    cfg = ModelConfig(norm=scheme, norm_type=args.norm_type, num_layers=args.num_layers,
                      hidden_size=args.hidden_size, num_heads=args.num_heads,
                      vocab_size=args.vocab_size, max_seq_len=args.seq_len)
    model = build_model(cfg).to(device=device, dtype=dtype)
    tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), device=device)

    def step():
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    return cfg, step


def time_round(step, steps, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.reference not in args.schemes:
        args.schemes.insert(0, args.reference)
    steps = {s: make_step(args, s, device, dtype) for s in args.schemes}
    for _, step in steps.values():  # warm-up: allocator, kernels
        step()
    times = {s: [] for s in args.schemes}
    for _ in range(args.rounds):
        for scheme, (_, step) in steps.items():
            times[scheme].append(time_round(step, args.steps, device))
    tokens = args.batch_size * args.seq_len
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} d={args.hidden_size} "
          f"L={args.num_layers} seq={args.seq_len} batch={args.batch_size}")
    print(f"{'scheme':<12}{'tokens/s':>12}{'GFLOP/s':>10}{'time vs ' + args.reference:>18}")
    ref = statistics.median(times[args.reference])
    for scheme, (cfg, _) in steps.items():
        t = statistics.median(times[scheme])
        gflops = flops_per_token(cfg, args.seq_len) * tokens / t / 1e9
        print(f"{scheme:<12}{tokens / t:>12.0f}{gflops:>10.1f}{t / ref:>18.3f}")


if __name__ == "__main__":
    main()
