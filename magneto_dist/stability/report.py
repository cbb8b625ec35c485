"""report.md of a sweep, from results.jsonl: per depth and width a plain reading and the loss
table, then the scaling view (largest stable LR and best loss against depth and width), then
every cell's verdict.

Everything here is derived from the recorded rows, so `--report-only` redraws it at any time.
The readings respect the seeds: a difference between two schemes is called only when the 95%
confidence intervals of their means over seeds (Student's t: mean +- t * sd / sqrt(n)) do not
overlap; with fewer than two seeds each, the reading says that no comparison can be made.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..files import atomic_write
from .verdicts import VERDICTS

MARKS = {"ok": "", "spiky": " (spiky)", "stuck": " (stuck)", "diverged": " (diverged)",
         "crashed": " (crashed)"}
CONFIDENCE = 0.95
RULE = ("A difference between two schemes is called only when the 95% confidence intervals of "
        "their means over seeds (Student's t: mean +- t * sd / sqrt(n)) do not overlap; with "
        "fewer than two seeds each no comparison is made.")
PAIRS = (("magneto", "pre_ln"), ("deepnorm", "post_ln"))  # the papers' claims


def variant(row: dict) -> str:
    """The scheme with what a cell adds to it: RMSNorm, QK-norm, the z-loss, muP, GQA, WSD
    (rows from before an option lack its key and read as without it)."""
    parts = [row["scheme"]] + ["rms"] * (row["norm_type"] != "layernorm")
    parts += ["qk_norm"] * bool(row.get("qk_norm"))
    parts += [f"z{row['z_loss']:g}"] if row.get("z_loss") else []
    parts += ["mup"] * (row.get("parametrization") == "mup")
    parts += [f"gqa{row['num_query_groups']}"] if row.get("num_query_groups") else []
    parts += ["wsd"] * (row.get("schedule") == "wsd")
    return "+".join(parts)


def pairs(variants: List[str]) -> List[tuple]:
    """The comparisons a report reads: the papers' (Magneto against Pre-LN, DeepNorm against
    Post-LN) and, with today's options in the grid, each Magneto variant against each Pre-LN
    variant that carries options (Pre-LN + QK-norm, + z-loss: what a modern recipe uses)."""
    modern = [(a, b) for a in variants if a.split("+")[0] == "magneto"
              for b in variants if b.split("+")[0] == "pre_ln" and "+" in b]
    return list(dict.fromkeys([*PAIRS, *modern]))


class Grid:
    """The rows arranged by (depth, width, variant, lr) -> the rows of its seeds."""

    def __init__(self, rows: List[dict]):
        self.rows = rows
        self.depths = sorted({r["depth"] for r in rows})
        self.widths = sorted({r.get("hidden_size") or 0 for r in rows})
        self.variants = list(dict.fromkeys(variant(r) for r in rows))
        self.lrs = sorted({r["lr"] for r in rows})
        self.seeds = sorted({r["seed"] for r in rows})
        self.groups: Dict[tuple, List[dict]] = defaultdict(list)
        for r in rows:
            self.groups[(r["depth"], r.get("hidden_size") or 0, variant(r), r["lr"])].append(r)

    def get(self, depth, width, var, lr) -> List[dict]:
        return self.groups.get((depth, width, var, lr), [])

    def shapes(self) -> List[Tuple[int, int]]:
        return [(d, w) for d in self.depths for w in self.widths
                if any(self.get(d, w, v, lr) for v in self.variants for lr in self.lrs)]

    def largest_stable_lr(self, depth, width, var) -> Optional[float]:
        """The largest LR at which every seed's verdict is ok."""
        stable = [lr for lr in self.lrs if self.get(depth, width, var, lr)
                  and all(r["verdict"] == "ok" for r in self.get(depth, width, var, lr))]
        return max(stable) if stable else None

    def per_seed(self, depth, width, var) -> Dict[int, dict]:
        """seed -> {"lr": its largest ok LR (None: none), "loss": its best final validation loss
        among its ok cells (None: none)}."""
        out = {}
        for seed in self.seeds:
            ok = [r for lr in self.lrs for r in self.get(depth, width, var, lr)
                  if r["seed"] == seed and r["verdict"] == "ok"]
            ran = any(r["seed"] == seed for lr in self.lrs for r in self.get(depth, width, var, lr))
            if not ran:
                continue
            losses = [r["final_valid_loss"] for r in ok if _finite(r["final_valid_loss"])]
            out[seed] = {"lr": max((r["lr"] for r in ok), default=None),
                         "loss": min(losses) if losses else None}
        return out


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def _worst(rows: List[dict]) -> str:
    return max((r["verdict"] for r in rows), key=VERDICTS.index)


def interval(values: List[float]) -> Optional[Tuple[float, float, float]]:
    """(mean, low, high) of the 95% confidence interval of the mean; None below two values."""
    if len(values) < 2:
        return None
    from scipy import stats
    mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1)) * sd / math.sqrt(len(values))
    return mean, mean - half, mean + half


def compare(a: List[float], b: List[float]) -> Optional[int]:
    """-1 if a is below b, 1 if above, 0 if the intervals overlap; None: too few seeds."""
    ia, ib = interval(a), interval(b)
    if ia is None or ib is None:
        return None
    return -1 if ia[2] < ib[1] else 1 if ia[1] > ib[2] else 0


def spread(values: List[float], digits: int = 3) -> str:
    """mean +- sd (n), or the value alone for one seed."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return (f"{np.mean(values):.{digits}f} +- {np.std(values, ddof=1):.{digits}f} "
            f"(n={len(values)})")


def lr_range(lrs: List[Optional[float]]) -> str:
    """The seeds' largest stable LRs: one value, or 'low to high' ('none': a seed stable at no
    LR of the grid), with how many seeds are stable at any LR."""
    if not lrs:
        return "-"
    known = [x for x in lrs if x is not None]
    if not known:
        return "none"
    low = "none" if len(known) < len(lrs) else f"{min(known):g}"
    text = f"{max(known):g}" if low == f"{max(known):g}" else f"{low} to {max(known):g}"
    return text + (f" ({len(known)}/{len(lrs)} seeds)" if len(lrs) > 1 else "")


def _versus(grid: Grid, depth, width, a: str, b: str) -> str:
    """Sentences on a papers' claim (a tolerates larger LRs than b, and trains as well),
    called by the confidence-interval rule."""
    if a not in grid.variants or b not in grid.variants:
        return ""
    sa, sb = grid.per_seed(depth, width, a), grid.per_seed(depth, width, b)
    if not sa or not sb:
        return ""
    if min(len(sa), len(sb)) < 2:
        return (f" {a} against {b}: one seed, so no comparison can be made (a difference is "
                "called only when it exceeds the spread over seeds).")
    floor = math.log2(min(grid.lrs)) - 1  # a seed stable at no LR counts as below the grid
    la = [math.log2(s["lr"]) if s["lr"] else floor for s in sa.values()]
    lb = [math.log2(s["lr"]) if s["lr"] else floor for s in sb.values()]
    verdict = compare(la, lb)
    top = math.log2(max(grid.lrs))
    same = ("both stable up to the grid's largest LR (add larger grid.lrs to tell them apart)"
            if min(la + lb) == top else "no difference beyond the spread over seeds")
    lr_text = (f"largest stable LR {lr_range([s['lr'] for s in sa.values()])} against "
               f"{lr_range([s['lr'] for s in sb.values()])}: " +
               {1: f"{a} tolerates larger LRs", -1: f"{b} tolerates larger LRs", 0: same}[verdict])
    loss_a = [s["loss"] for s in sa.values() if s["loss"] is not None]
    loss_b = [s["loss"] for s in sb.values() if s["loss"] is not None]
    verdict = compare(loss_a, loss_b)
    if verdict is None:
        loss_text = "too few seeds trained stably to compare their losses"
    else:
        loss_text = (f"best stable validation loss {spread(loss_a)} against {spread(loss_b)}: "
                     + {-1: f"{a} better", 1: f"{b} better",
                        0: "the confidence intervals overlap, no difference called"}[verdict])
    return f" {a} against {b}: {lr_text}; {loss_text}."


def _reading(grid: Grid, depth, width) -> str:
    """One paragraph of plain facts from the table of one depth and width."""
    parts = []
    for var in grid.variants:
        verdicts = {lr: _worst(grid.get(depth, width, var, lr)) for lr in grid.lrs
                    if grid.get(depth, width, var, lr)}
        if not verdicts:
            continue
        failed = [f"{lr:g} ({v})" for lr, v in verdicts.items() if v != "ok"]
        best = grid.largest_stable_lr(depth, width, var)
        parts.append(f"{var} " + (f"trained (ok on every seed) at LRs up to {best:g}" if best
                                  else "was ok on every seed at no LR of the grid")
                     + (f", failed at {', '.join(failed)}" if failed else ""))
    return (f"At depth {depth}, width {width}: " + "; ".join(parts) + "."
            + "".join(_versus(grid, depth, width, a, b) for a, b in pairs(grid.variants)))


def _cell_text(rows: List[dict]) -> str:
    values = [r["final_valid_loss"] if r["final_valid_loss"] is not None else r["final_loss"]
              for r in rows]
    values = [v for v in values if _finite(v)]
    ok = sum(r["verdict"] == "ok" for r in rows)
    mixed = f" {ok}/{len(rows)} ok" if 0 < ok < len(rows) else ""
    return spread(values).replace(f" (n={len(values)})", "") + MARKS[_worst(rows)] + mixed


def _shape_table(grid: Grid, depth, width) -> List[str]:
    lines = ["| scheme | " + " | ".join(f"lr {lr:g}" for lr in grid.lrs)
             + " | largest stable LR | best valid loss over seeds |",
             "|---|" + "---|" * (len(grid.lrs) + 2)]
    for var in grid.variants:
        cells = [_cell_text(grid.get(depth, width, var, lr)) if grid.get(depth, width, var, lr)
                 else "" for lr in grid.lrs]
        best = grid.largest_stable_lr(depth, width, var)
        losses = [s["loss"] for s in grid.per_seed(depth, width, var).values()
                  if s["loss"] is not None]
        lines.append(f"| {var} | " + " | ".join(cells) + f" | {f'{best:g}' if best else 'none'}"
                     f" | {spread(losses)} |")
    return lines


def _scaling_table(grid: Grid, axis: str, fixed) -> List[str]:
    """Per scheme: largest stable LR and best loss over seeds against depth or width."""
    values = grid.depths if axis == "depth" else grid.widths
    lines = [f"| scheme | " + " | ".join(f"{axis} {v}" for v in values) + " |",
             "|---|" + "---|" * len(values)]
    for var in grid.variants:
        cells = []
        for v in values:
            depth, width = (v, fixed) if axis == "depth" else (fixed, v)
            seeds = grid.per_seed(depth, width, var)
            losses = [s["loss"] for s in seeds.values() if s["loss"] is not None]
            cells.append(f"{lr_range([s['lr'] for s in seeds.values()])}; "
                         f"{spread(losses)}" if seeds else "")
        lines.append(f"| {var} | " + " | ".join(cells) + " |")
    return lines


def write_markdown(rows: List[dict], out_dir: str, title: str, plots: List[str] = ()) -> str:
    grid = Grid(rows)
    entropy = next((r["unigram_entropy"] for r in rows if r.get("unigram_entropy")), None)
    lines = [f"# Stability sweep: {title}", "",
             f"{len(rows)} cells, {len(grid.seeds)} seed(s) each. Values are the final validation"
             " loss (mean +- sample sd over seeds where there are several), marked with the worst"
             " verdict of their seeds. " + RULE
             + (f" Unigram entropy of the corpus: {entropy:.3f} nats (the 'stuck' plateau)."
                if entropy else ""), ""]
    for depth, width in grid.shapes():
        lines += [f"## Depth {depth}, width {width}", "", _reading(grid, depth, width), "",
                  *_shape_table(grid, depth, width), ""]
    lines += ["## Scaling", "", "Each entry: the largest LR at which a seed trains (ok), over "
              "seeds; then the best stable validation loss, mean +- sd over seeds.", ""]
    for width in grid.widths:
        lines += [f"Against depth, width {width}:", "", *_scaling_table(grid, "depth", width), ""]
    for depth in grid.depths:
        lines += [f"Against width, depth {depth}:", "", *_scaling_table(grid, "width", depth), ""]
    lines += ["## Verdicts", "", "| cell | verdict | reason | steps | seconds | job |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['cell']} | {r['verdict']} | {r['reason']} | {r['steps_done']} | "
              f"{r['seconds']:.0f} | {r.get('job_id') or ''} |" for r in rows]
    if plots:
        lines += ["", "Plots: " + ", ".join(f"[{os.path.basename(p)}]({os.path.basename(p)})"
                                            for p in plots)]
    path = os.path.join(out_dir, "report.md")
    atomic_write(path, "\n".join(lines) + "\n")
    return path
