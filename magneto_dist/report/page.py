"""The report page: a summary per run, the curves (figures.py), the events (restarts, stragglers,
loss spikes), the layout, the config keys that differ between the runs and each run's whole
config. Plain HTML and one PNG beside it, no script: it opens from a file or a CI artifact."""
from __future__ import annotations

import html
import os
import statistics
from typing import Dict, List

from ..files import atomic_write
from .figures import CURVES, draw_curves
from .runs import Run, load_runs

REPORT = "report.html"
STYLE = ("body{font-family:sans-serif;margin:1.5em;max-width:1700px}"
         "table{border-collapse:collapse;margin:0.5em 0 1.5em}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}"
         "th{background:#f2f2f2}img{max-width:100%;border:1px solid #ddd}"
         "pre{background:#f7f7f7;padding:0.5em;overflow-x:auto}.differs{background:#fff3c4}")


def _table(header: List[str], rows: List[List[object]]) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_text(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _median(rows: List[dict], key: str):
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None


def _summary(runs: List[Run]) -> str:
    rows = []
    for run in runs:
        train, valid = run.train, run.valid
        times = [r["time"] for r in run.rows if "time" in r]
        mfu = _median(train, "mfu")
        rows.append([
            run.label, train[-1]["step"] if train else 0,
            f"{run.tokens([train[-1]['step']])[0]:,.0f}" if train else 0,
            train[-1]["loss"] if train else None,
            min((r["loss"] for r in valid), default=None),
            _median(train, "tokens_per_s"), f"{mfu:.1%}" if mfu is not None else "-",
            sum(r.get("skipped_steps", 0) for r in train), len(run.restarts()),
            len(run.split("straggler")), len(run.split("spike")),
            f"{(max(times) - min(times)) / 60:.1f}" if times else None])
    return _table(["run", "steps", "tokens", "last loss", "best validation loss",
                   "tokens/s (median)", "MFU (median)", "skipped steps", "restarts",
                   "stragglers named", "loss spikes", "minutes logged"], rows)


def _layout(runs: List[Run]) -> str:
    """Each run's layout (every attempt's, when a restart changed it) and model and batch."""
    rows = []
    for run in runs:
        m, t = run.config.get("model") or {}, run.config.get("train") or {}
        rows.append([run.label, "; ".join(run.layouts()) or "(no startup row)",
                     f"{m.get('arch', '?')} {m.get('norm', '?')}: {m.get('num_layers', '?')} "
                     f"layers x {m.get('hidden_size', '?')}, {m.get('num_heads', '?')} heads, "
                     f"{m.get('max_seq_len', '?')} tokens",
                     f"{t.get('global_batch_size', '?')} ({t.get('micro_batch_size', '?')} a "
                     "micro-batch)", t.get("precision"), t.get("zero_stage")])
    return _table(["run", "layout", "model", "global batch", "precision", "ZeRO"], rows)


def _events(runs: List[Run]) -> str:
    restarts = [[run.label, r["step"], r["tag"], r["cause"]] for run in runs
                for r in run.restarts()]
    stragglers = [[run.label, r["step"], r["rank"], r.get("host"), r.get("section"),
                   r.get("ratio"), r.get("slowdown"), r.get("late_s")]
                  for run in runs for r in run.split("straggler")]
    spikes = [[run.label, r["step"], r.get("loss"), r.get("action")]
              for run in runs for r in run.split("spike")]
    parts = []
    for title, header, rows in (
            ("Restarts", ["run", "resumed at step", "checkpoint", "cause"], restarts),
            ("Stragglers", ["run", "step", "rank", "host", "fell behind in",
                            "section time vs peers", "step slowdown", "peers waited (s)"],
             stragglers),
            ("Loss spikes", ["run", "step", "loss", "action"], spikes)):
        parts.append(f"<h3>{title}</h3>" + (_table(header, rows) if rows else "<p>none</p>"))
    return "".join(parts)


def _flat(config: dict, prefix: str = "") -> Dict[str, object]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _config(runs: List[Run]) -> str:
    flat = [_flat(run.config) for run in runs]
    keys = sorted(set().union(*flat))
    differ = [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1]
    shown = differ if len(runs) > 1 else []
    parts = []
    if len(runs) > 1:
        parts.append("<h3>Config keys that differ</h3>" + (_table(
            ["key", *[r.label for r in runs]], [[k, *[f.get(k) for f in flat]] for k in shown])
            if shown else "<p>none: the runs share every key</p>"))
    for run, config in zip(runs, flat):
        lines = "\n".join(f"{k}: {v!r}" for k, v in config.items()) or "(no config.yaml)"
        parts.append(f"<details><summary>{html.escape(run.label)}: the whole config "
                     f"({len(config)} keys)</summary><pre>{html.escape(lines)}</pre></details>")
    return "".join(parts)


def write_report(run_dirs: List[str], out_dir: str) -> str:
    """report.html and its PNG in out_dir, for one run or several side by side; -> its path."""
    runs = load_runs(run_dirs)
    os.makedirs(out_dir, exist_ok=True)
    draw_curves(runs, os.path.join(out_dir, CURVES))
    title = "run report: " + ", ".join(r.label for r in runs)
    body = (f"<h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(' | '.join(os.path.abspath(r.path) for r in runs))}</p>"
            f"<h2>Summary</h2>{_summary(runs)}"
            f"<h2>Curves</h2><img src=\"{CURVES}\" alt=\"loss, learning rate, grad norm, "
            f"throughput, efficiency and skipped steps against tokens\">"
            f"<h2>Events</h2>{_events(runs)}<h2>Layout and config</h2>{_layout(runs)}"
            f"{_config(runs)}")
    path = os.path.join(out_dir, REPORT)
    atomic_write(path, f"<!doctype html><html><head><meta charset=\"utf-8\"><title>"
                       f"{html.escape(title)}</title><style>{STYLE}</style></head><body>{body}"
                       "</body></html>\n")
    return path
