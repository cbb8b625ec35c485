"""The straggler check's judgement (training/stragglers.py) on section times built by hand, and its
clock. Without peers (one rank, or a rank per pipeline stage) it is off and costs nothing."""
import numpy as np
import pytest
import torch

from magneto_dist.training import stragglers
from magneto_dist.training.stragglers import INDEX, SECTIONS, SectionClock, judge

MARGIN = 0.5
STEP = {"data": 0.001, "forward": 0.010, "backward": 0.020, "optimizer": 0.005,
        "logging": 0.0005, "wait": 0.0005}  # a healthy rank's step, seconds


def healthy(ranks, steps, jitter=0.0, seed=0):
    """[ranks, steps, sections] of ranks that keep pace, each section +-jitter (relative)."""
    rng = np.random.default_rng(seed)
    times = np.zeros((ranks, steps, len(SECTIONS)))
    for name, seconds in STEP.items():
        times[:, :, INDEX[name]] = seconds * (1 + jitter * rng.uniform(-1, 1, (ranks, steps)))
    return times


def slow_in(times, rank, section, seconds, collective="backward", steps=None):
    """`rank` spends `seconds` more in `section`; its peers wait that long in the next
    collective (`collective`), so every step still ends together, as on a real group."""
    steps = range(times.shape[1]) if steps is None else steps
    for t in steps:
        times[rank, t, INDEX[section]] += seconds
        for peer in range(times.shape[0]):
            if peer != rank:
                times[peer, t, INDEX[collective]] += seconds
    return times


@pytest.mark.parametrize("ranks", [2, 3, 8])
def test_the_slow_rank_is_named_and_not_the_ranks_that_waited_for_it(ranks):
    """Rank 1 sleeps 0.5 s in data; its peers wait 0.5 s in backward's gradient reduction.
    By section durations the waiting ranks' backward is the long one: judged by arrivals only
    rank 1 is named, in data, the others waited 0.5 s of a 0.537 s step for it."""
    times = slow_in(healthy(ranks, 10, jitter=0.05), rank=1, section="data", seconds=0.5)
    slowdowns, found = judge(times, [0] * ranks, MARGIN)
    assert [s.rank for s in found] == [1], found
    (s,) = found
    assert s.section == "data"
    assert s.late_s == pytest.approx(0.5, abs=0.002)
    assert s.step_s == pytest.approx(0.537, abs=0.005)
    assert s.slowdown == pytest.approx(0.537 / 0.037, rel=0.05)
    assert s.ratio == pytest.approx(0.501 / 0.001, rel=0.06)  # its data time over its peers'
    assert all(slowdowns[r] < 1.1 for r in range(ranks) if r != 1), slowdowns


def test_a_slow_forward_is_named_forward():
    times = slow_in(healthy(4, 10, jitter=0.05), rank=2, section="forward", seconds=0.05)
    _, found = judge(times, [0] * 4, MARGIN)
    assert [(s.rank, s.section) for s in found] == [(2, "forward")]
    assert found[0].ratio == pytest.approx(0.06 / 0.01, rel=0.06)


def test_healthy_ranks_with_jitter_are_not_named():
    """Every section +-30% at random on every rank: no one is persistently behind."""
    slowdowns, found = judge(healthy(8, 50, jitter=0.3, seed=3), [0] * 8, MARGIN)
    assert not found and slowdowns.max() < 1 + MARGIN, slowdowns


def test_one_slow_step_in_an_interval_is_a_hiccup_not_a_straggler():
    times = slow_in(healthy(2, 10), rank=0, section="data", seconds=2.0, steps=[3])
    slowdowns, found = judge(times, [0, 0], MARGIN)
    assert not found and slowdowns[0] == pytest.approx(1.0), slowdowns
    times = slow_in(healthy(2, 10), rank=0, section="data", seconds=2.0, steps=range(6))
    assert [s.rank for s in judge(times, [0, 0], MARGIN)[1]] == [0]  # most steps: named


def test_a_delay_under_the_margin_is_not_named():
    times = slow_in(healthy(2, 10), rank=1, section="forward", seconds=0.012)  # 1.33x the step
    slowdowns, found = judge(times, [0, 0], MARGIN)
    assert not found and slowdowns[1] == pytest.approx(0.049 / 0.037, rel=0.02)
    assert [s.rank for s in judge(times, [0, 0], 0.2)[1]] == [1]  # a lower margin names it


def test_ranks_are_compared_within_their_pipeline_stage():
    """Stage 0's ranks arrive later than stage 1's by design (other work): not stragglers;
    a slow rank within stage 1 is named against its stage's peers."""
    times = healthy(4, 10)
    times[[0, 1], :, INDEX["pipeline"]] += 0.1   # stage 0's schedule is longer
    times[[2, 3], :, INDEX["wait"]] += 0.1       # and stage 1 waits for it
    assert judge(times, [0, 0, 1, 1], MARGIN)[1] == []
    slow_in(times, rank=3, section="data", seconds=0.5, collective="pipeline")
    times[[0, 1], :, INDEX["wait"]] += 0.5       # stage 0 waits for stage 1's slow rank too
    assert [(s.rank, s.section) for s in judge(times, [0, 0, 1, 1], MARGIN)[1]] == [(3, "data")]


def test_a_rank_alone_in_its_stage_has_no_peers():
    times = slow_in(healthy(2, 10), rank=1, section="data", seconds=0.5)
    slowdowns, found = judge(times, [0, 1], MARGIN)
    assert not found and list(slowdowns) == [1.0, 1.0]


def test_the_clock_gives_each_span_to_its_section_and_skips_paused_work(monkeypatch):
    """Laps name the span before them; a pause's earlier span goes to the next lap, the paused
    span (evaluation, a save) to no section."""
    now = iter([0.0, 1.0, 3.0, 3.5, 10.0, 10.25, 11.0])
    monkeypatch.setattr(stragglers.time, "perf_counter", lambda: next(now))
    clock = SectionClock(torch.device("cpu"))
    clock.begin()            # 0.0
    clock.lap("data")        # 1.0: data 1
    clock.lap("forward")     # 3.0: forward 2
    clock.pause()            # 3.5: 0.5 carried to the next lap
    clock.resume()           # 10.0: 6.5 paused, dropped
    clock.lap("logging")     # 10.25: logging 0.5 + 0.25
    clock.lap("data")        # 11.0: data 1 + 0.75
    seconds = dict(zip(SECTIONS, clock.seconds()))
    assert seconds == {"data": 1.75, "forward": 2.0, "backward": 0.0, "optimizer": 0.0,
                       "pipeline": 0.0, "logging": 0.75, "wait": 0.0}


def test_without_peers_or_interval_the_check_is_off(monkeypatch):
    monkeypatch.setattr(stragglers.dist, "get_world_size", lambda: 4)
    device = torch.device("cpu")
    assert stragglers.straggler_check(0, MARGIN, device, None, 1) is stragglers.NO_CHECK
    assert stragglers.straggler_check(10, MARGIN, device, None, 4) is stragglers.NO_CHECK
    monkeypatch.setattr(stragglers.dist, "get_world_size", lambda: 1)
    assert stragglers.straggler_check(10, MARGIN, device, None, 1) is stragglers.NO_CHECK
