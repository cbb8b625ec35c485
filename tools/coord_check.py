"""muP's coordinate check (Yang et al. 2022, "Tensor Programs V", section 5): train the same
small model at several widths for a few Adam steps, under the standard parametrization and
under muP, and record the RMS of every layer's output and of the output logits per step.

    python tools/coord_check.py --widths 64 128 256 512 --steps 3 --out runs/coord_check

Under muP each curve is flat in width (an update moves every coordinate by a width-free amount);
under the standard parametrization the logits, and the layers' outputs after the first step,
grow with width (Adam's per-entry step adds up over fan_in). Writes OUT/coord_check.json (every
RMS) and OUT/coord_check.png; the last line printed is

    coordinate check: output-logit growth over widths 64->512 after 3 steps: standard Xx, mup Yx

the ratio of the logits' RMS at the largest width to that at the smallest, after the last step.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List

import torch
import torch.nn.functional as F

from magneto_dist.config import load_config
from magneto_dist.model import build_model
from magneto_dist.training.engine import optimizer_param_groups

PARAMETRIZATIONS = ("standard", "mup")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--head-dim", type=int, default=16, help="heads = width / head dim")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--norm", default="pre_ln", help="model.norm scheme")
    p.add_argument("--steps", type=int, default=3, help="Adam steps")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("runs", "coord_check"))
    return p.parse_args(argv)


def model_config(args, width: int, parametrization: str):
    """The run config of one width; muP's base width is the smallest width checked."""
    mup = ([f"model.mup_base_hidden_size={min(args.widths)}"]
           if parametrization == "mup" else [])
    return load_config(None, [
        f"model.norm={args.norm}", f"model.num_layers={args.num_layers}",
        f"model.hidden_size={width}", f"model.num_heads={width // args.head_dim}",
        f"model.ffn_hidden_size={4 * width}", f"model.vocab_size={args.vocab_size}",
        f"model.max_seq_len={args.seq_len}", "model.dropout=0.0",
        f"model.parametrization={parametrization}", *mup,
        f"train.lr={args.lr}", "train.weight_decay=0.0"])


def rms(x: torch.Tensor) -> float:
    return float(x.detach().float().pow(2).mean().sqrt())


def record_width(args, width: int, parametrization: str) -> Dict[str, List[float]]:
    """{"layer i": [RMS per step], "logits": [...]}: step 0 is at init, step k after k updates,
    all on the same fixed batch (the one the model trains on)."""
    cfg = model_config(args, width, parametrization)
    model = build_model(cfg.model, seed=args.seed)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, cfg), lr=args.lr)
    tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1),
                           generator=torch.Generator().manual_seed(args.seed))
    record: Dict[str, List[float]] = {}
    outputs: Dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.decoder.layers):
        layer.register_forward_hook(
            lambda module, inputs, out, key=f"layer {i}": outputs.__setitem__(key, out))
    for step in range(args.steps + 1):
        logits = model(tokens[:, :-1])                                       # [b, s, vocab]
        for key, value in [*outputs.items(), ("logits", logits)]:
            record.setdefault(key, []).append(rms(value))
        if step == args.steps:
            break
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return record


def growth(records: Dict[int, Dict[str, List[float]]], key: str = "logits") -> float:
    """RMS of `key` after the last step at the largest width over that at the smallest."""
    widths = sorted(records)
    return records[widths[-1]][key][-1] / records[widths[0]][key][-1]


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = list(next(iter(results["standard"].values())))
    fig, axes = plt.subplots(len(PARAMETRIZATIONS), len(keys), squeeze=False,
                             figsize=(3.2 * len(keys), 3 * len(PARAMETRIZATIONS)))
    for row, name in enumerate(PARAMETRIZATIONS):
        widths = sorted(results[name])
        for col, key in enumerate(keys):
            ax = axes[row][col]
            steps = len(results[name][widths[0]][key])
            for step in range(steps):
                ax.plot(widths, [results[name][w][key][step] for w in widths], marker="o",
                        label=f"step {step}")
            ax.set(xscale="log", yscale="log", title=f"{name}: {key}", xlabel="width",
                   ylabel="RMS")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = {name: {w: record_width(args, w, name) for w in sorted(args.widths)}
               for name in PARAMETRIZATIONS}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "coord_check.json"), "w", encoding="utf-8") as f:
        json.dump({name: {str(w): r for w, r in by.items()} for name, by in results.items()}, f)
    plot(results, os.path.join(args.out, "coord_check.png"))
    for name in PARAMETRIZATIONS:
        layers = ", ".join(f"{key} {growth(results[name], key):.2f}x"
                           for key in results[name][min(args.widths)] if key != "logits")
        print(f"{name}: growth of each layer's output RMS over widths: {layers}")
    lo, hi = min(args.widths), max(args.widths)
    print(f"coordinate check: output-logit growth over widths {lo}->{hi} after {args.steps} "
          f"steps: standard {growth(results['standard']):.2f}x, mup {growth(results['mup']):.2f}x")
    return results


if __name__ == "__main__":
    main()
