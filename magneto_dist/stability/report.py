"""report.md and the plots of a sweep, from results.jsonl and the cells' metrics.jsonl.

Everything here is derived from the recorded rows, so `--report-only` redraws it at any time,
and the plain reading at the top of each depth states what the numbers show, nothing more.
"""
from __future__ import annotations

import itertools
import math
import os
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..files import atomic_write
from .sweep import train_losses
from .verdicts import VERDICTS

MARKS = {"ok": "", "spiky": " (spiky)", "stuck": " (stuck)", "diverged": " (diverged)",
         "crashed": " (crashed)"}
PLOTS = ("loss_curves.png", "lr_sensitivity.png", "divergence_map.png", "grad_norm_init.png",
         "residual_rms.png")


def _variant(row: dict) -> str:
    return row["scheme"] if row["norm_type"] == "layernorm" else f"{row['scheme']}+rms"


def _axes(rows: List[dict]) -> Tuple[List[int], List[str], List[float]]:
    depths = sorted({r["depth"] for r in rows})
    variants = list(dict.fromkeys(_variant(r) for r in rows))
    lrs = sorted({r["lr"] for r in rows})
    return depths, variants, lrs


def _group(rows: List[dict]) -> Dict[tuple, List[dict]]:
    """(depth, variant, lr) -> the rows of its seeds."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["depth"], _variant(r), r["lr"])].append(r)
    return groups


def _worst(rows: List[dict]) -> str:
    return max((r["verdict"] for r in rows), key=VERDICTS.index)


def _cell_text(rows: List[dict]) -> str:
    values = [r["final_valid_loss"] if r["final_valid_loss"] is not None else r["final_loss"]
              for r in rows]
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        text = "-"
    elif len(values) == 1:
        text = f"{values[0]:.3f}"
    else:
        text = f"{np.mean(values):.3f} +- {np.std(values):.3f}"
    return text + MARKS[_worst(rows)]


def largest_stable_lr(groups, depth: int, variant: str, lrs: List[float]) -> Optional[float]:
    """The largest LR at which every seed's verdict is ok."""
    stable = [lr for lr in lrs if groups.get((depth, variant, lr))
              and all(r["verdict"] == "ok" for r in groups[(depth, variant, lr)])]
    return max(stable) if stable else None


def _reading(groups, depth: int, variants: List[str], lrs: List[float]) -> str:
    """One paragraph of plain facts from the table of one depth."""
    parts = []
    for variant in variants:
        verdicts = {lr: _worst(groups[(depth, variant, lr)]) for lr in lrs
                    if groups.get((depth, variant, lr))}
        failed = [f"{lr:g} ({v})" for lr, v in verdicts.items() if v != "ok"]
        best = largest_stable_lr(groups, depth, variant, lrs)
        parts.append(f"{variant} " + (f"trained (verdict ok) at LRs up to {best:g}" if best
                                      else "trained at no LR of the grid")
                     + (f", failed at {', '.join(failed)}" if failed else ""))
    finals = {v: min((np.mean([r["final_valid_loss"] for r in groups[(depth, v, lr)]])
                      for lr in lrs if groups.get((depth, v, lr))
                      and all(r["final_valid_loss"] is not None and r["verdict"] == "ok"
                              for r in groups[(depth, v, lr)])), default=None)
              for v in variants}
    ranked = sorted((loss, v) for v, loss in finals.items() if loss is not None)
    order = ("; best validation loss among stable cells: "
             + ", ".join(f"{v} {loss:.3f}" for loss, v in ranked)) if ranked else ""
    return f"At depth {depth}: " + "; ".join(parts) + order + "." + _versus(
        groups, depth, lrs, finals, "magneto", "pre_ln")


def _versus(groups, depth, lrs, finals, a: str, b: str) -> str:
    """One sentence on the papers' claim that a tolerates larger LRs than b (and trains as well)."""
    if a not in finals or b not in finals:
        return ""
    lr_a, lr_b = (largest_stable_lr(groups, depth, v, lrs) for v in (a, b))
    if lr_a == lr_b:
        lr_text = f"{a} and {b} have the same largest stable LR ({lr_a or 'none'})"
    else:
        lr_text = (f"{a}'s largest stable LR is {lr_a or 'none'}, {b}'s {lr_b or 'none'}; this "
                   f"grid {'does' if (lr_a or 0) > (lr_b or 0) else 'does not'} show {a} "
                   f"tolerating larger LRs")
    loss_a, loss_b = finals[a], finals[b]
    if loss_a is None or loss_b is None:
        return f" {lr_text}."
    return (f" {lr_text}; {a}'s best stable validation loss is {loss_a:.3f} against {b}'s "
            f"{loss_b:.3f} ({a} {'better' if loss_a < loss_b else 'not better'}).")


def _table_row(groups, depth: int, variant: str, lrs: List[float]) -> str:
    """| scheme | one value per LR | largest stable LR | best validation loss |"""
    cells = [_cell_text(groups[(depth, variant, lr)]) if groups.get((depth, variant, lr)) else ""
             for lr in lrs]
    best_lr = largest_stable_lr(groups, depth, variant, lrs)
    losses = [r["best_valid_loss"] for lr in lrs for r in groups.get((depth, variant, lr), [])]
    losses = [x for x in losses if x is not None and math.isfinite(x)]
    return (f"| {variant} | " + " | ".join(cells) + f" | {f'{best_lr:g}' if best_lr else 'none'}"
            + f" | {f'{min(losses):.3f}' if losses else '-'} |")


def write_markdown(rows: List[dict], out_dir: str, title: str) -> str:
    depths, variants, lrs = _axes(rows)
    groups = _group(rows)
    entropy = next((r["unigram_entropy"] for r in rows if r.get("unigram_entropy")), None)
    lines = [f"# Stability sweep: {title}", "",
             f"{len(rows)} cells; values are the final validation loss (mean +- std over seeds "
             "where there are several), marked with the worst verdict of their seeds. "
             + (f"Unigram entropy of the corpus: {entropy:.3f} nats (the 'stuck' plateau)."
                if entropy else ""), ""]
    for depth in depths:
        lines += [f"## Depth {depth}", "", _reading(groups, depth, variants, lrs), "",
                  "| scheme | " + " | ".join(f"lr {lr:g}" for lr in lrs)
                  + " | largest stable LR | best valid loss |",
                  "|---|" + "---|" * (len(lrs) + 2)]
        lines += [_table_row(groups, depth, variant, lrs) for variant in variants] + [""]
    lines += ["## Verdicts", "", "| cell | verdict | reason | steps | seconds |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['cell']} | {r['verdict']} | {r['reason']} | {r['steps_done']} | "
              f"{r['seconds']:.0f} |" for r in rows]
    lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in PLOTS), ""]
    path = os.path.join(out_dir, "report.md")
    atomic_write(path, "\n".join(lines))
    return path


def _figure(plt, depths: List[int], title: str):
    fig, axes = plt.subplots(1, len(depths), figsize=(5 * len(depths), 4), squeeze=False)
    fig.suptitle(title)
    return fig, list(zip(axes[0], depths))


def _smooth(values: List[float], window: int = 10) -> np.ndarray:
    """A trailing moving average (the CPU miniature's batches are noisy: ~0.2 nats a step)."""
    values = np.asarray(values, dtype=float)
    return np.array([np.mean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))])


def _plot_curves(plt, ctx, path):
    fig, panels = _figure(plt, ctx["depths"], "training loss, 10-step moving average "
                                             "(first seed; line style = LR)")
    for ax, depth in panels:
        for (d, variant, lr), row in ctx["first_seed"].items():
            if d == depth:
                ax.plot(_smooth(train_losses(row["run_dir"])), color=ctx["colors"][variant],
                        ls=ctx["styles"][lr], label=f"{variant} lr {lr:g}")
        ax.set(title=f"depth {depth}", xlabel="step", ylabel="loss")
        ax.legend(fontsize=6)
    fig.savefig(path, dpi=90)


def _plot_lr_sensitivity(plt, ctx, path):
    fig, panels = _figure(plt, ctx["depths"], "final validation loss vs LR")
    groups = ctx["groups"]
    for ax, depth in panels:
        for variant in ctx["variants"]:
            points = [(lr, np.mean([r["final_valid_loss"] for r in groups[(depth, variant, lr)]]))
                      for lr in ctx["lrs"] if groups.get((depth, variant, lr)) and all(
                          r["final_valid_loss"] is not None for r in groups[(depth, variant, lr)])]
            if points:
                ax.plot(*zip(*points), "o-", color=ctx["colors"][variant], label=variant)
        ax.set(title=f"depth {depth}", xscale="log", xlabel="lr", ylabel="valid loss")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=90)


def _plot_divergence_map(plt, ctx, path):
    variants, lrs = ctx["variants"], ctx["lrs"]
    fig, panels = _figure(plt, ctx["depths"], "verdict: " + ", ".join(
        f"{i}={v}" for i, v in enumerate(VERDICTS)))
    for ax, depth in panels:
        grid = np.full((len(variants), len(lrs)), np.nan)
        for (i, variant), (j, lr) in itertools.product(enumerate(variants), enumerate(lrs)):
            if ctx["groups"].get((depth, variant, lr)):
                grid[i, j] = VERDICTS.index(_worst(ctx["groups"][(depth, variant, lr)]))
        ax.imshow(grid, cmap="RdYlGn_r", vmin=0, vmax=len(VERDICTS) - 1)
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(j, i, VERDICTS[int(value)], ha="center", va="center", fontsize=7)
        ax.set(title=f"depth {depth}", xticks=range(len(lrs)), yticks=range(len(variants)),
               xticklabels=[f"{lr:g}" for lr in lrs], yticklabels=variants, xlabel="lr")
    fig.savefig(path, dpi=90)


def _plot_layer_profile(plt, ctx, path, key: str, ylabel: str):
    fig, panels = _figure(plt, ctx["depths"], f"{ylabel} by layer (first seed, lowest LR)")
    for ax, depth in panels:
        for variant in ctx["variants"]:
            row = ctx["first_seed"].get((depth, variant, ctx["lrs"][0]))
            if row and row.get(key):
                ax.plot(range(1, len(row[key]) + 1), row[key], "o-", ms=3,
                        color=ctx["colors"][variant], label=variant)
        ax.set(title=f"depth {depth}", xlabel="layer", ylabel=ylabel, yscale="log")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=90)


def write_plots(rows: List[dict], out_dir: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    depths, variants, lrs = _axes(rows)
    groups = _group(rows)
    ctx = {"depths": depths, "variants": variants, "lrs": lrs, "groups": groups,
           "colors": {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)},
           "styles": {lr: style for lr, style in zip(lrs, itertools.cycle(["-", "--", ":", "-."]))},
           "first_seed": {key: min(rs, key=lambda r: r["seed"]) for key, rs in groups.items()}}
    paths = [os.path.join(out_dir, p) for p in PLOTS]
    _plot_curves(plt, ctx, paths[0])
    _plot_lr_sensitivity(plt, ctx, paths[1])
    _plot_divergence_map(plt, ctx, paths[2])
    _plot_layer_profile(plt, ctx, paths[3], "grad_norm_init", "grad norm at init")
    _plot_layer_profile(plt, ctx, paths[4], "residual_rms_final", "residual RMS (last measure)")
    plt.close("all")
    return paths
