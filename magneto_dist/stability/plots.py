"""The sweep's PNG plots, from results.jsonl and the cells' metrics.jsonl.

Sized for reading: a panel per depth and width (and per LR for the loss curves) instead of one
crowded axis, one legend per figure, titles and labels laid out inside the canvas
(constrained layout), and seeds drawn as a mean with their range (a band or error bars), so a
paper-scale grid (72 layers, 6 schemes, several seeds) stays legible.
"""
from __future__ import annotations

import math
import os
from typing import List

import numpy as np
from matplotlib.colors import ListedColormap

from ..plotting import figure, finish, pyplot, smooth, wrap
from .report import Grid
from .sweep import train_losses
from .verdicts import VERDICTS

PLOTS = ("loss_curves.png", "lr_sensitivity.png", "divergence_map.png", "grad_norm_init.png",
         "residual_rms.png")
SCALING_PLOTS = ("scaling_depth.png", "scaling_width.png")  # with two depths / widths or more
# light colours, one per verdict in VERDICTS' order, so the black text on them stays readable
VERDICT_COLORS = ["#b8e0a8", "#fff0a0", "#fdd09a", "#f4a08a", "#c8c8c8"]


def _plot_curves(plt, grid: Grid, colors, path: str) -> None:
    shapes = grid.shapes()
    fig, axes = figure(plt, len(shapes), len(grid.lrs), "training loss, moving average "
                       "(line: mean over seeds, band: their range)")
    handles, top, bottom = {}, -np.inf, np.inf
    for (i, (depth, width)), (j, lr) in ((a, b) for a in enumerate(shapes)
                                         for b in enumerate(grid.lrs)):
        ax = axes[i, j]
        for var in grid.variants:
            curves = [np.asarray(train_losses(r["run_dir"]), dtype=float)
                      for r in grid.get(depth, width, var, lr)]
            curves = [c for c in curves if len(c)]
            if not curves:
                continue
            length = max(len(c) for c in curves)
            window = max(10, length // 100)
            stack = np.full((len(curves), length), np.nan)
            for k, c in enumerate(curves):
                stack[k, :len(c)] = smooth(c, window)
            steps = np.arange(1, length + 1)
            with np.errstate(all="ignore"):
                mean = np.nanmean(np.where(np.isfinite(stack), stack, np.nan), axis=0)
            handles[var], = ax.plot(steps, mean, color=colors[var], lw=1.4)
            if len(curves) > 1:
                ax.fill_between(steps, np.nanmin(stack, 0), np.nanmax(stack, 0),
                                color=colors[var], alpha=0.2, lw=0)
            start = [c[0] for c in curves if math.isfinite(c[0])]
            top = max(top, max(start, default=-np.inf))
            bottom = min(bottom, np.nanmin(mean) if np.isfinite(mean).any() else np.inf)
        ax.set_title(f"depth {depth}, width {width}, lr {lr:g}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
    if np.isfinite(top) and np.isfinite(bottom):  # diverged curves run off the top
        for ax in axes.flat:
            ax.set_ylim(bottom - 0.2, top + 0.5)
    finish(fig, axes, handles, path)


def _lr_axis(ax, lrs: List[float]) -> None:
    ax.set_xscale("log")
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
    ax.minorticks_off()


def _plot_lr_sensitivity(plt, grid: Grid, colors, path: str) -> None:
    shapes = grid.shapes()
    fig, axes = figure(plt, *wrap(len(shapes)), "final validation loss against LR, cells ok "
                       "on every seed (mean over seeds, bars: sd); x at the top: a seed not ok "
                       "(see divergence_map.png)")
    handles = {}
    for ax, (depth, width) in zip(axes.flat, shapes):
        for var in grid.variants:
            points, failed = [], []
            for lr in grid.lrs:
                cell = grid.get(depth, width, var, lr)
                values = [r["final_valid_loss"] for r in cell]
                if cell and all(r["verdict"] == "ok" for r in cell) and all(
                        v is not None and math.isfinite(v) for v in values):
                    points.append((lr, np.mean(values),
                                   np.std(values, ddof=1) if len(values) > 1 else 0.0))
                elif cell:
                    failed.append(lr)
            if points:
                xs, ys, errs = zip(*points)
                handles[var] = ax.errorbar(xs, ys, yerr=errs, fmt="o-", ms=4, capsize=3,
                                           color=colors[var])
            if failed:
                ax.plot(failed, [0.97] * len(failed), "x", ms=8, mew=2, color=colors[var],
                        transform=ax.get_xaxis_transform())
        _lr_axis(ax, grid.lrs)
        ax.set(title=f"depth {depth}, width {width}", xlabel="learning rate",
               ylabel="validation loss")
    finish(fig, axes, handles, path)


def _plot_divergence_map(plt, grid: Grid, path: str) -> None:
    shapes = grid.shapes()
    rows, cols = wrap(len(shapes))
    fig, axes = figure(plt, rows, cols, "worst verdict over seeds (k/n: seeds ok): green ok, "
                       "yellow spiky, orange stuck, red diverged, grey crashed")
    cmap = ListedColormap(VERDICT_COLORS)
    for ax, (depth, width) in zip(axes.flat, shapes):
        table = np.full((len(grid.variants), len(grid.lrs)), np.nan)
        for i, var in enumerate(grid.variants):
            for j, lr in enumerate(grid.lrs):
                cell = grid.get(depth, width, var, lr)
                if not cell:
                    continue
                worst = max((r["verdict"] for r in cell), key=VERDICTS.index)
                table[i, j] = VERDICTS.index(worst)
                ok = sum(r["verdict"] == "ok" for r in cell)
                ax.text(j, i, worst + (f"\n{ok}/{len(cell)}" if len(cell) > 1 else ""),
                        ha="center", va="center", fontsize=8)
        ax.imshow(table, cmap=cmap, vmin=-0.5, vmax=len(VERDICTS) - 0.5, aspect="auto")
        ax.set(title=f"depth {depth}, width {width}", xticks=range(len(grid.lrs)),
               yticks=range(len(grid.variants)), xticklabels=[f"{lr:g}" for lr in grid.lrs],
               yticklabels=grid.variants, xlabel="learning rate")
    finish(fig, axes, {}, path)


def _plot_layer_profile(plt, grid: Grid, colors, path: str, key: str, label: str) -> None:
    shapes = grid.shapes()
    lr = grid.lrs[0]
    fig, axes = figure(plt, *wrap(len(shapes)), f"{label} by layer, lowest LR {lr:g} (mean "
                       "over seeds, band: their range)")
    handles = {}
    for ax, (depth, width) in zip(axes.flat, shapes):
        for var in grid.variants:
            profiles = [r[key] for r in grid.get(depth, width, var, lr) if r.get(key)]
            if not profiles:
                continue
            stack = np.array(profiles, dtype=float)
            layers = np.arange(1, stack.shape[1] + 1)
            handles[var], = ax.plot(layers, stack.mean(0), "o-", ms=2.5, color=colors[var])
            if len(profiles) > 1:
                ax.fill_between(layers, stack.min(0), stack.max(0), color=colors[var],
                                alpha=0.2, lw=0)
        ax.set(title=f"depth {depth}, width {width}", xlabel="layer", ylabel=label,
               yscale="log")
    finish(fig, axes, handles, path)


def _plot_scaling(plt, grid: Grid, colors, path: str, axis: str) -> None:
    """Largest stable LR and best loss per scheme against depth (a panel per width) or width
    (a panel per depth): the papers' scaling view. The x axis is categorical and each scheme
    is shifted a little, so schemes with equal values stay visible side by side."""
    xs, panels = (grid.depths, grid.widths) if axis == "depth" else (grid.widths, grid.depths)
    fig, axes = figure(plt, 2, len(panels), f"against {axis}: largest stable LR (geometric "
                       "mean, bars: range over seeds) and best stable validation loss (mean, "
                       "bars: sd)")
    handles, n = {}, len(grid.variants)
    for j, fixed in enumerate(panels):
        for k, var in enumerate(grid.variants):
            shift = (k - (n - 1) / 2) * 0.5 / max(n, 1)
            lr_pts, loss_pts = [], []
            for i, x in enumerate(xs):
                depth, width = (x, fixed) if axis == "depth" else (fixed, x)
                seeds = list(grid.per_seed(depth, width, var).values())
                lrs = [s["lr"] for s in seeds if s["lr"]]
                if lrs:
                    g = float(np.exp(np.mean(np.log(lrs))))
                    lr_pts.append((i + shift, g, max(0.0, g - min(lrs)), max(0.0, max(lrs) - g)))
                losses = [s["loss"] for s in seeds if s["loss"] is not None]
                if losses:
                    loss_pts.append((i + shift, np.mean(losses),
                                     np.std(losses, ddof=1) if len(losses) > 1 else 0.0))
            if lr_pts:
                x, g, lo, hi = zip(*lr_pts)
                handles[var] = axes[0, j].errorbar(x, g, yerr=[lo, hi], fmt="o-", capsize=3,
                                                   color=colors[var])
            if loss_pts:
                x, m, sd = zip(*loss_pts)
                axes[1, j].errorbar(x, m, yerr=sd, fmt="o-", capsize=3, color=colors[var])
        name = "width" if axis == "depth" else "depth"
        ticks = dict(xticks=range(len(xs)), xticklabels=[str(x) for x in xs],
                     xlim=(-0.5, len(xs) - 0.5), xlabel=axis)
        axes[0, j].set(title=f"{name} {fixed}", yscale="log", ylabel="largest stable LR",
                       ylim=(min(grid.lrs) / 1.5, max(grid.lrs) * 1.5), **ticks)
        axes[0, j].set_yticks(grid.lrs, [f"{lr:g}" for lr in grid.lrs])
        axes[0, j].minorticks_off()
        axes[1, j].set(title=f"{name} {fixed}", ylabel="best validation loss", **ticks)
    finish(fig, axes, handles, path)


def write_plots(rows: List[dict], out_dir: str) -> List[str]:
    """Every plot the rows allow; -> their paths (the scaling views need two depths or widths)."""
    plt = pyplot()
    grid = Grid(rows)
    colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(grid.variants)}
    paths = {name: os.path.join(out_dir, name) for name in PLOTS + SCALING_PLOTS}
    _plot_curves(plt, grid, colors, paths["loss_curves.png"])
    _plot_lr_sensitivity(plt, grid, colors, paths["lr_sensitivity.png"])
    _plot_divergence_map(plt, grid, paths["divergence_map.png"])
    _plot_layer_profile(plt, grid, colors, paths["grad_norm_init.png"], "grad_norm_init",
                        "gradient norm at init")
    _plot_layer_profile(plt, grid, colors, paths["residual_rms.png"], "residual_rms_final",
                        "residual RMS (last measure)")
    written = [paths[name] for name in PLOTS]
    for axis, name in (("depth", "scaling_depth.png"), ("width", "scaling_width.png")):
        if len(grid.depths if axis == "depth" else grid.widths) > 1:
            _plot_scaling(plt, grid, colors, paths[name], axis)
            written.append(paths[name])
    plt.close("all")
    return written
