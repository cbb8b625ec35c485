"""Stragglers: which rank keeps its peers waiting, in which part of its step, and by how much.

Every rank times the sections of its steps (SectionClock):
- data: from the step's start to its micro-batch in hand (the loader, and anything the rank does
  before it);
- forward: from the batch in hand (its copy to the device included) to the loss;
- backward: which ends, at the accumulation boundary, in DeepSpeed's gradient reduction;
- optimizer: the engine's step (clipping's norm, the update, ZeRO's parameter gathers);
- pipeline: the pipeline engine's whole schedule, when there is one (its parts are its own);
- logging: the grad norm, the checks and rank 0's metrics;
- wait: the loss's mean over data-parallel ranks and agree()'s all-reduce (waiting for peers).
Work outside training (evaluation, saves, diagnostics) is in no section.

Why arrivals and not durations: a collective makes every rank wait for the slowest, so a rank
that is slow in one section makes its peers wait in the next collective, and all steps end
together. Comparing durations blames the ranks that waited (their backward, holding the
gradient reduction, is the long one). Each section's end is instead an arrival, measured from
the step's start (every rank leaves the previous step's all-reduce together): a rank that falls
behind arrives late, and waiting only catches a rank up with the others, never puts it behind.
For each rank and step: its lateness at each section's end against its peers' (the median of
the others), the most it was behind (late_s: how long its peers waited for it), and the section
in which it fell behind.

What section times cannot tell apart: a slowdown inside a section that ends in a collective of
the same ranks is absorbed before the section ends (backward's own computation, before its
gradient reduction; forward and backward under tensor parallelism, whose all-reduces sync the TP
group; ZeRO-3's gathers). A slow device is still seen in its forward (without TP), a slow host
in its data section; a TP group slowed by one of its ranks is named whole, against the other
data-parallel replicas.

Every logging.straggler_interval steps the interval's section times (steps x sections floats a
rank) are gathered to rank 0 in one collective and judged there:
- peers: the ranks of the same pipeline stage (stages do different work by design);
- a rank's delay: the median over the interval's steps of its late_s, so that a persistent
  straggler is named and one step's hiccup (a preempted thread, the first step's set-up) is not;
- its slowdown: the step time over the step time without that delay, step_s / (step_s - late_s);
- a straggler: slowdown >= 1 + logging.straggler_margin. The default, 0.5, names a rank that
  makes every step half as long again (a third of the job's throughput), near NVRx's default
  (its detector flags a rank below 0.7 of the fastest rank's performance, 1.43x its time;
  Megatron's reports without a bar), and above what healthy ranks measured on this project's
  2-core CPU shared with other work (load 8-15): two clean ranks reached 1.44 over 5-step
  intervals, rank 0 each time (it also writes the metrics and TensorBoard, whose threads take
  its core's time), 1.17 without TensorBoard. On dedicated GPUs, whose jitter is a few percent,
  0.1-0.2 names milder stragglers; the per-rank TensorBoard scalars show every rank's slowdown.
A straggler is named with its host, the section in which it fell behind and how much longer its
time there was than its peers' (ratio): a console line and a {"split": "straggler"} row
(training/metrics.py), and every rank's slowdown is a TensorBoard scalar at every check.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

SECTIONS = ("data", "forward", "backward", "optimizer", "pipeline", "logging", "wait")
INDEX = {name: i for i, name in enumerate(SECTIONS)}
_CARRY, _DROP = -1, -2  # a mark whose span goes to the next lap's section; a paused span


class SectionClock:
    """This rank's seconds per section of the current step. On CUDA the marks are events on
    the current stream, the device's timeline (the host only queues kernels), read once the step
    has been synchronized: agree()'s all-reduce has returned its values to the host by then."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: List[Tuple[int, object]] = []  # (what the span before it was, when)

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin(self) -> None:
        self.marks = [(_CARRY, self._now())]

    def lap(self, section: str) -> None:
        """The time since the previous mark was `section`'s."""
        self.marks.append((INDEX[section], self._now()))

    def pause(self) -> None:
        """Until resume(): in no section (the time before it goes to the next lap's section)."""
        self.marks.append((_CARRY, self._now()))

    def resume(self) -> None:
        self.marks.append((_DROP, self._now()))

    def seconds(self) -> List[float]:
        """Each section's seconds since begin()."""
        if self.cuda:
            self.marks[-1][1].synchronize()  # the last mark was queued after the sync
        out, carried = [0.0] * len(SECTIONS), 0.0
        for (_, start), (label, end) in zip(self.marks, self.marks[1:]):
            span = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            if label == _CARRY:
                carried += span
            elif label != _DROP:
                out[label] += carried + span
                carried = 0.0
        return out


@dataclass
class Straggler:
    rank: int
    section: str             # where it fell behind its peers
    ratio: Optional[float]   # its seconds in that section over its peers' (None: theirs are 0)
    slowdown: float          # step_s / (step_s - late_s)
    late_s: float            # median over the steps of how long its peers waited for it
    step_s: float            # median step time of its peers


def _peers(values: np.ndarray) -> np.ndarray:
    """For each rank of a group (axis 0), its peers' value: the other rank's in a group of two,
    else the group's median (which one rank moves by one order statistic at most)."""
    if len(values) == 2:
        return values[::-1]
    return np.broadcast_to(np.median(values, axis=0), values.shape)


def judge(times: np.ndarray, stages: Sequence[int], margin: float
          ) -> Tuple[np.ndarray, List[Straggler]]:
    """times: [ranks, steps, sections] seconds; stages: each rank's pipeline stage (its peers
    are the ranks of the same one). -> (every rank's slowdown, the stragglers)."""
    slowdowns = np.ones(times.shape[0])
    found = []
    arrivals = np.cumsum(times, axis=2)                       # [R, T, S] each section's end
    for stage in sorted(set(stages)):
        group = [r for r, s in enumerate(stages) if s == stage]
        if len(group) < 2:
            continue
        arrive = arrivals[group]                                # [n, T, S]
        late = np.clip(arrive - _peers(arrive), 0.0, None)      # [n, T, S] behind its peers
        fell_behind = np.clip(np.diff(late, axis=2, prepend=0.0), 0.0, None).sum(axis=1)  # [n, S]
        totals = times[group].sum(axis=1)                       # [n, S] seconds per section
        peer_totals = _peers(totals)
        step_s = float(np.median(arrive[:, :, -1]))
        for i, rank in enumerate(group):
            late_s = float(np.median(late[i].max(axis=1)))
            slowdowns[rank] = step_s / max(step_s - late_s, 1e-3 * step_s)
            if slowdowns[rank] < 1 + margin:
                continue
            s = int(np.argmax(fell_behind[i]))
            ratio = totals[i, s] / peer_totals[i, s] if peer_totals[i, s] > 0 else None
            found.append(Straggler(rank, SECTIONS[s], None if ratio is None else float(ratio),
                                   float(slowdowns[rank]), late_s, step_s))
    return slowdowns, found


class NoStragglerCheck:
    """logging.straggler_interval=0, or no rank has a peer: nothing timed, nothing gathered."""

    def begin_step(self) -> None:
        pass

    def lap(self, section: str) -> None:
        pass

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def end_step(self, step: int) -> None:
        pass


NO_CHECK = NoStragglerCheck()


class StragglerCheck(NoStragglerCheck):
    """Times this rank's sections every step; every `interval` steps, collective: rank 0
    gathers every rank's and names the stragglers (metrics: the MetricsLogger, rank 0's)."""

    def __init__(self, interval: int, margin: float, device: torch.device, stage: int, metrics):
        self.interval, self.margin, self.device = interval, margin, device
        self.stage, self.metrics = stage, metrics
        self.clock = SectionClock(device)
        self.steps: List[List[float]] = []  # this interval's steps, each its section seconds
        self.peers: Optional[List[Tuple[str, int]]] = None  # rank 0: (host, stage) of each rank
        self.introduced = False  # whether this rank sent rank 0 its host and stage

    def begin_step(self) -> None:
        self.clock.begin()

    def lap(self, section: str) -> None:
        self.clock.lap(section)

    def pause(self) -> None:
        self.clock.pause()

    def resume(self) -> None:
        self.clock.resume()

    def end_step(self, step: int) -> None:
        """Collective every `interval` steps (every rank calls it at every step)."""
        self.steps.append(self.clock.seconds())
        if step % self.interval == 0:
            self.check(step)
            self.steps = []

    def _gather(self) -> Optional[np.ndarray]:
        """Rank 0: [ranks, steps, sections] of this interval (None elsewhere)."""
        rank, world = dist.get_rank(), dist.get_world_size()
        if not self.introduced:  # once: who runs where
            self.peers = [None] * world if rank == 0 else None
            dist.gather_object((socket.gethostname(), self.stage), self.peers, dst=0)
            self.introduced = True
        mine = torch.tensor(self.steps, dtype=torch.float64, device=self.device)
        every = [torch.empty_like(mine) for _ in range(world)] if rank == 0 else None
        dist.gather(mine, every, dst=0)
        return torch.stack(every).cpu().numpy() if rank == 0 else None

    def check(self, step: int) -> None:
        times = self._gather()
        if times is None:
            return
        slowdowns, stragglers = judge(times, [stage for _, stage in self.peers], self.margin)
        self.metrics.slowdowns(step, slowdowns.tolist())
        first = step - len(self.steps) + 1
        for s in stragglers:
            self.metrics.straggler({"step": step, "rank": s.rank, "host": self.peers[s.rank][0],
                                    "section": s.section, "ratio": s.ratio,
                                    "slowdown": s.slowdown, "late_s": s.late_s,
                                    "step_s": s.step_s, "first_step": first})


def straggler_check(interval: int, margin: float, device: torch.device, metrics,
                    stages: int):
    """The check for this run (every rank builds it the same way): NO_CHECK when it is off or
    when no rank has a peer (one rank a pipeline stage)."""
    if not interval or dist.get_world_size() <= stages:
        return NO_CHECK
    from ..parallel.state import pp_rank  # deferred: megatron-core's import is seconds
    return StragglerCheck(interval, margin, device, pp_rank(), metrics)
