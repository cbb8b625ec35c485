"""Reading a run's RUN_DIR/metrics.jsonl (training/metrics.py writes it). Kept free of torch, so
that the launcher's bookkeeping and a stability cell's job process read it cheaply.

A resumed run replays the steps after its checkpoint: a {"split": "resume", "step": s} row
starts each attempt, and the rows an earlier attempt wrote after step s no longer count.
"""
from __future__ import annotations

import os
from typing import List, Optional

from ..files import read_jsonl

METRICS = "metrics.jsonl"  # in the run directory


def read_metrics(run_dir: str, split: Optional[str] = None, log=None) -> List[dict]:
    """Every row in the order written (of one split, when given); a line that does not parse
    is skipped, with a warning naming file:line when `log` is given."""
    path = os.path.join(run_dir, METRICS)
    warn = (lambda number, line: log(f"WARNING: {path}:{number}: not a JSON line, skipped: "
                                     f"{line[:80]!r}")) if log else None
    rows = read_jsonl(path, warn)
    return [r for r in rows if split is None or r.get("split") == split]


def current_rows(run_dir: str) -> List[dict]:
    """The rows as they stand now: where an attempt resumed at step s, the earlier attempts'
    rows after step s are dropped, since the new attempt replays those steps."""
    rows: List[dict] = []
    for row in read_metrics(run_dir):
        if row.get("split") == "resume":
            rows = [r for r in rows if r.get("step", 0) <= row.get("step", 0)]
        rows.append(row)
    return rows


def last_per_step(rows: List[dict], split: str) -> List[dict]:
    """The rows of one split, the last occurrence of each step, in step order."""
    by_step = {r["step"]: r for r in rows if r.get("split") == split}
    return [by_step[s] for s in sorted(by_step)]
