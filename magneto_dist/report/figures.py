"""The report's PNG: six panels against tokens trained (loss and validation loss, learning rate,
grad norm, tokens/s, MFU or TFLOP/s per device, skipped steps), one colour per run, and the
run's events marked where they happened: restarts (a dashed line in every panel), loss spikes
(on the loss), stragglers (on tokens/s) and skipped steps (on the loss's floor). Drawn in the
project's house style (magneto_dist/plotting.py, shared with the stability sweep's plots); each
mark's artist has a gid naming its kind, so a test can find it."""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from ..plotting import figure, finish, pyplot, smooth
from .runs import Run

CURVES = "curves.png"
# each kind of event: its marker, and the legend's words for it
MARKS = {"restart": ("--", "restart (resumed here)"), "spike": ("X", "loss spike"),
         "straggler": ("v", "straggler (rank, section)"), "skipped": ("|", "skipped step(s)")}
MAX_POINTS_RAW = 50  # longer curves get a moving average over a 50th of their length


def _values(rows: List[dict], key: str):
    """(steps, values) of the rows that have a finite `key`."""
    pairs = [(r["step"], r[key]) for r in rows
             if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])]
    return (np.array([p[0] for p in pairs], dtype=float),
            np.array([p[1] for p in pairs], dtype=float))


def _curve(ax, run: Run, rows: List[dict], key: str, color, scale: float = 1.0, **style):
    steps, values = _values(rows, key)
    if not len(steps):
        return None
    x, values = run.tokens(steps), values * scale
    window = max(1, len(values) // MAX_POINTS_RAW)
    if window > 1:  # the raw points faint, their moving average on top
        ax.plot(x, values, color=color, lw=0.6, alpha=0.3)
        values = smooth(values, window)
    line, = ax.plot(x, values, color=color, lw=1.4, **style)
    return line


def _loss_panel(ax, run: Run, color) -> None:
    line = _curve(ax, run, run.train, "loss", color)
    _curve(ax, run, run.valid, "loss", color, ls="--", marker="o", ms=3.5)
    spikes = run.split("spike")
    if spikes:
        steps, losses = _values(spikes, "loss")
        ax.plot(run.tokens(steps), losses, MARKS["spike"][0], ms=9, mew=1.2, color=color,
                mec="black", ls="none", gid="spike")
        for row in spikes:
            ax.annotate(str(row.get("action", "")), (run.tokens([row["step"]])[0], row["loss"]),
                        textcoords="offset points", xytext=(4, 6), fontsize=8)
    skipped = [r["step"] for r in run.train if r.get("skipped_steps")]
    if skipped and line is not None:
        ax.plot(run.tokens(skipped), [0.02] * len(skipped), MARKS["skipped"][0], ms=10,
                mew=1.5, color=color, ls="none", transform=ax.get_xaxis_transform(),
                gid="skipped")
    ax.set(title="training loss (line) and validation loss (dashed, o)", ylabel="loss")


def _throughput_panel(ax, run: Run, color) -> None:
    _curve(ax, run, run.train, "tokens_per_s", color)
    stragglers = run.split("straggler")
    if not stragglers:
        return
    steps, rates = _values(run.train, "tokens_per_s")
    at = np.array([r["step"] for r in stragglers], dtype=float)
    # each straggler row at its check's step, on the curve (the nearest logged rate)
    y = np.interp(at, steps, rates) if len(steps) else np.zeros(len(at))
    ax.plot(run.tokens(at), y, MARKS["straggler"][0], ms=9, color=color, mec="black",
            ls="none", gid="straggler")
    named = set()  # each rank and section named at its first check only (the table has all)
    for row, x, rate in zip(stragglers, run.tokens(at), y):
        if (row["rank"], row["section"]) not in named:
            named.add((row["rank"], row["section"]))
            ax.annotate(f"rank {row['rank']}: {row['section']}", (x, rate), fontsize=8,
                        textcoords="offset points", xytext=(5, -13))


def _efficiency_panel(ax, runs: List[Run], colors) -> None:
    """MFU where a run has it (a known GPU or logging.peak_tflops), else TFLOP/s per device."""
    with_mfu = any(_values(r.train, "mfu")[0].size for r in runs)
    key, scale, label = (("mfu", 100.0, "MFU (%)") if with_mfu
                         else ("tflops_per_device", 1.0, "TFLOP/s per device"))
    for run in runs:
        _curve(ax, run, run.train, key, colors[run.label], scale)
    title = "model FLOPs utilization" if with_mfu else \
        "TFLOP/s per device (no MFU: no peak known; logging.peak_tflops)"
    ax.set(title=title, ylabel=label)


def _skipped_panel(ax, runs: List[Run], colors) -> None:
    from matplotlib.ticker import MaxNLocator

    most = 0
    for run in runs:
        steps, skipped = _values(run.train, "skipped_steps")
        if len(steps):
            ax.step(run.tokens(steps), np.cumsum(skipped), where="post",
                    color=colors[run.label], lw=1.4)
            most = max(most, int(skipped.sum()))
    if not most:
        ax.text(0.5, 0.5, "no step skipped", transform=ax.transAxes, ha="center",
                va="center", color="grey")
    ax.set(title="skipped steps so far (fp16 back-offs, non-finite)", ylabel="steps",
           ylim=(-0.05 * max(most, 1), 1.1 * max(most, 1)))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _grad_norm_panel(ax, runs: List[Run], colors) -> None:
    """Log scale where the norms span more than 20x (an early spike would flatten the rest)."""
    spread = [v for run in runs for v in _values(run.train, "grad_norm")[1] if v > 0]
    for run in runs:
        _curve(ax, run, run.train, "grad_norm", colors[run.label])
    log = bool(spread) and max(spread) > 20 * min(spread)
    ax.set(title="gradient norm (before clipping)" + (", log scale" if log else ""),
           ylabel="norm", yscale="log" if log else "linear")


def _restarts(axes, run: Run, color) -> None:
    for restart in run.restarts():
        x = run.tokens([restart["step"]])[0]
        for ax in axes.flat:
            ax.axvline(x, color=color, ls=MARKS["restart"][0], lw=1.0, alpha=0.8, gid="restart")
        axes[0, 0].annotate(restart["cause"], (x, 0.98), xycoords=("data", "axes fraction"),
                            rotation=90, va="top", ha="right", fontsize=8)


def draw_curves(runs: List[Run], path: str):
    """Write the panels to `path`; -> the figure (closed: for inspection only)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter

    plt = pyplot()
    colors = {run.label: plt.cm.tab10(i % 10) for i, run in enumerate(runs)}
    fig, axes = figure(plt, 2, 3, "against tokens trained: " + ", ".join(r.label for r in runs))
    for run in runs:
        color = colors[run.label]
        _loss_panel(axes[0, 0], run, color)
        _curve(axes[0, 1], run, run.train, "lr", color)
        _throughput_panel(axes[1, 0], run, color)
        _restarts(axes, run, color)
    _grad_norm_panel(axes[0, 2], runs, colors)
    _efficiency_panel(axes[1, 1], runs, colors)
    _skipped_panel(axes[1, 2], runs, colors)
    axes[0, 1].set(title="learning rate", ylabel="lr")
    axes[1, 0].set(title="throughput, stragglers named (v)", ylabel="tokens/s")
    logged = any(run.train for run in runs)
    for ax in axes.flat:
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
        if not logged:  # a run that has not logged a step yet: say so, not "0.2 m tokens"
            title = ax.get_title()
            ax.clear()
            ax.set(xticks=[], yticks=[], title=title)
            ax.text(0.5, 0.5, "no training step logged yet", transform=ax.transAxes,
                    ha="center", va="center", color="grey")
    handles: Dict[str, object] = {run.label: Line2D([], [], color=colors[run.label], lw=2)
                                  for run in runs}
    present = {kind for ax in axes.flat for artist in ax.get_children()
               for kind in [artist.get_gid()] if kind in MARKS}
    for kind in MARKS:
        if kind in present:
            marker, words = MARKS[kind]
            handles[words] = (Line2D([], [], color="grey", ls=marker) if kind == "restart" else
                              Line2D([], [], color="grey", marker=marker, ls="none", ms=8,
                                     mec="black"))
    finish(fig, axes, handles, path)
    plt.close(fig)
    return fig
