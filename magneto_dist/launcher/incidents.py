"""RUN_DIR/restarts.jsonl, one row per incident, and the summary printed when the launcher exits.

A row: {"time", "attempt", "node", "rank", "cause", "step_reached", "resumed_from",
"seconds_lost"}. cause is "exit N", "signal NAME", "hang" (killed by the step watchdog),
"node lost" (the group re-formed with fewer nodes) or "preempted" (SIGTERM to the launcher: a
planned stop, no restart). step_reached is the last step logged to metrics.jsonl, resumed_from
the step of the newest complete checkpoint (where the next attempt starts), seconds_lost the
training time between the two, which the next attempt does again.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import List, Optional

from ..checkpoint import manager as ckpt
from ..files import read_jsonl
from ..training.metrics import read_metrics

RESTARTS = "restarts.jsonl"


def train_rows(run_dir: str) -> List[dict]:
    return read_metrics(run_dir, "train")


def cause_of(exitcode: int, hung: bool) -> str:
    import signal

    if hung:
        return "hang"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit {exitcode}"


class IncidentLog:
    """Appends incidents to RUN_DIR/restarts.jsonl (every node's launcher to the same file on a
    shared filesystem: one short append per row)."""

    def __init__(self, run_dir: str, node: Optional[str] = None):
        self.run_dir = run_dir
        self.node = node or socket.gethostname()
        self.path = os.path.join(run_dir, RESTARTS)
        self.started = time.time()

    def record(self, attempt: int, cause: str, rank: Optional[int] = None) -> dict:
        steps = train_rows(self.run_dir)
        reached = steps[-1]["step"] if steps else 0
        tag = ckpt.find_resume_tag(os.path.join(self.run_dir, "checkpoints"), "auto",
                                   log=lambda _: None)
        resumed = int(ckpt.TAG.match(tag).group(1)) if tag else 0
        since = [r["time"] for r in steps if r["step"] == resumed]
        start = since[-1] if since else (steps[0]["time"] if steps else time.time())
        row = {"time": time.time(), "attempt": attempt, "node": self.node, "rank": rank,
               "cause": cause, "step_reached": reached, "resumed_from": resumed,
               "seconds_lost": round(max(0.0, time.time() - start), 2)}
        os.makedirs(self.run_dir, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def summary(self) -> str:
        """Incidents, time lost and goodput (productive step time / wall time) of this launch."""
        incidents = [r for r in read_jsonl(self.path) if r["time"] >= self.started]
        wall = time.time() - self.started
        productive = productive_seconds(read_metrics(self.run_dir), self.started)
        lost = sum(r["seconds_lost"] for r in incidents)
        return (f"{len(incidents)} incident(s), {lost:.0f} s of training redone, goodput "
                f"{productive / max(wall, 1e-9):.0%} ({productive:.0f} s of kept steps in "
                f"{wall:.0f} s)")


def productive_seconds(rows: List[dict], since: float) -> float:
    """Time spent on the steps whose results were kept: each train row's time since the
    previous row of the same attempt (an attempt starts at a "resume" row), counted only for
    the last occurrence of its step."""
    last_of = {}
    for index, row in enumerate(rows):
        if row.get("split") == "train" and row["time"] >= since:
            last_of[row["step"]] = index
    kept, previous = 0.0, None
    for index, row in enumerate(rows):
        if row.get("split") == "resume":
            previous = row["time"]
        elif row.get("split") == "train":
            if previous is not None and last_of.get(row["step"]) == index:
                kept += row["time"] - previous
            previous = row["time"]
    return kept
