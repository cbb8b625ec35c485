"""RUN_DIR/restarts.jsonl, one row per incident, and the summary printed when the launcher exits.

A row: {"time", "attempt", "node", "rank", "cause", "step_reached", "resumed_from",
"seconds_lost", "seconds_stalled", "where", "slow"}. cause is "exit N", "signal NAME", "hang"
(killed by the step watchdog), "node lost" (the group re-formed with fewer nodes) or "preempted"
(SIGTERM to the launcher: a planned stop, no restart). step_reached is the last step logged to
metrics.jsonl, resumed_from the step of the newest complete checkpoint (where the next attempt
starts).
seconds_lost is the time the failed attempt spent on the steps after that checkpoint, which the
next attempt does again; seconds_stalled the time from the attempt's last logged progress to the
failure's detection (a hang until the watchdog killed it, or the part of a step that a crash cut
short; 0 when the attempt had made no progress: a crash in start-up, or a re-rendezvous);
where, for a hang, the hung rank's innermost frame ("path:line in function"), else null;
slow, the stragglers the failed attempt's last straggler check named (each {"rank", "host",
"section", "ratio", "slowdown", "step"}; [] when none was named), which says which node was slow
before a hang or a restart.

How time is counted: metrics.jsonl's train rows are grouped into attempts, each ending at an
incident (and each launch starts one). A row's steps took the time since the previous train or
resume row of the same attempt. An attempt's first row without a resume row before it (a fresh
start) has no logged start: its time is not counted, and neither is anything before an
attempt's first logged step (start-up, checkpoint load) or after its last (a hang, a restart).
With train.log_interval > 1 a row stands for its whole interval: to that resolution.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Iterable, List, Optional, Tuple

from ..checkpoint.resume import resume_point
from ..checkpoint.tags import CheckpointDir
from ..files import read_jsonl
from ..training.metrics_file import read_metrics

RESTARTS = "restarts.jsonl"


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


def timed_rows(rows: List[dict], breaks: Iterable[float]) -> List[Tuple[dict, Optional[float]]]:
    """Each train row with the seconds its steps took (None: not known, an attempt's first row
    without a resume row). `breaks`: the times at which attempts ended (incidents, a launch's
    start); a row's previous row must be of the same attempt."""
    breaks = sorted(breaks)
    timed, previous = [], None
    for row in rows:
        split = row.get("split")
        if split not in ("train", "resume"):
            continue
        if previous is not None and any(previous < b <= row["time"] for b in breaks):
            previous = None  # an attempt ended between the two rows
        if split == "train":
            timed.append((row, None if previous is None else row["time"] - previous))
        previous = row["time"]
    return timed


def productive_seconds(rows: List[dict], since: float, breaks: Iterable[float] = ()) -> float:
    """Time spent on the steps whose results were kept: for each step logged since `since`, its
    last occurrence's time (timed_rows)."""
    timed = timed_rows(rows, breaks)
    last_of = {row["step"]: index for index, (row, _) in enumerate(timed) if row["time"] >= since}
    return sum(seconds for index, (row, seconds) in enumerate(timed)
               if seconds is not None and last_of.get(row["step"]) == index)


def slow_before(rows: List[dict], since: float) -> List[dict]:
    """The stragglers that the last straggler check since `since` named (training/metrics.py's
    straggler rows, written at the step of the check)."""
    named = [r for r in rows if r.get("split") == "straggler" and r.get("time", 0) > since]
    if not named:
        return []
    last = max(r["step"] for r in named)
    return [{k: r.get(k) for k in ("rank", "host", "section", "ratio", "slowdown", "step")}
            for r in named if r["step"] == last]


class IncidentLog:
    """Appends incidents to RUN_DIR/restarts.jsonl (every node's launcher to the same file on a
    shared filesystem: one short append per row)."""

    def __init__(self, run_dir: str, node: Optional[str] = None,
                 started: Optional[float] = None):
        """started: when the launch began (time.time(); default now)."""
        self.run_dir = run_dir
        self.node = node or socket.gethostname()
        self.path = os.path.join(run_dir, RESTARTS)
        self.started = time.time() if started is None else started

    def incidents(self) -> List[dict]:
        """This launch's rows (every node's)."""
        return [r for r in read_jsonl(self.path) if r.get("time", 0) >= self.started]

    def breaks(self) -> List[float]:
        """Where this launch's attempts end and begin: its start and its incidents."""
        return [self.started] + [r["time"] for r in self.incidents()]

    def record(self, attempt: int, cause: str, rank: Optional[int] = None,
               where: Optional[str] = None) -> dict:
        now, rows, breaks = time.time(), read_metrics(self.run_dir), self.breaks()
        attempt_start = max(b for b in breaks if b <= now)
        steps = [r for r in rows if r.get("split") == "train"]
        reached = steps[-1]["step"] if steps else 0
        tag = resume_point(CheckpointDir.of_run(self.run_dir), contents=False)  # no reading
        resumed = tag.step if tag else 0
        this_attempt = [(r, s) for r, s in timed_rows(rows, breaks) if r["time"] > attempt_start]
        progress = [r["time"] for r in rows if r.get("split") in ("train", "resume")
                    and r["time"] > attempt_start]
        row = {"time": now, "attempt": attempt, "node": self.node, "rank": rank,
               "cause": cause, "step_reached": reached, "resumed_from": resumed,
               "seconds_lost": round(sum(s for r, s in this_attempt
                                         if s is not None and r["step"] > resumed), 2),
               "seconds_stalled": round(now - max(progress), 2) if progress else 0.0,
               "where": where, "slow": slow_before(rows, attempt_start)}
        os.makedirs(self.run_dir, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def steps_this_launch(self) -> List[dict]:
        return [r for r in read_metrics(self.run_dir, "train") if r["time"] >= self.started]

    def summary(self) -> str:
        """Incidents, time lost and goodput (productive step time / wall time) of this launch."""
        incidents, wall = self.incidents(), time.time() - self.started
        productive = productive_seconds(read_metrics(self.run_dir), self.started, self.breaks())
        redone = sum(r.get("seconds_lost", 0) for r in incidents)
        stalled = sum(r.get("seconds_stalled", 0) for r in incidents)
        goodput = productive / max(wall, 1e-9)
        return (f"{len(incidents)} incident(s), {redone:.0f} s of training redone, {stalled:.0f} "
                f"s stalled before a failure was detected; goodput {goodput:.0%} "
                f"({productive:.0f} s of kept steps in {wall:.0f} s)")
