"""Seeing inside real runs (launch/pretrain_gpt.py on gloo): a rank slowed by fault injection is
named as a straggler and a clean run of the same shape names none, the profile window writes a
trace per rank with the events of its steps, and tools/run_report.py renders a 1-rank, a 2-rank
and a resumed run."""
import json
import os
import socket

from magneto_dist.resilience.faults import FAULT_ENV
from magneto_dist.training.profiling import trace_path
from tools.run_report import main as run_report

from ..test_run_report import curve_pixels, pixels
from .gpt_runs import check_ok, gpt, read_metrics
from .ranks import run_ranks

INTERVAL = 5  # straggler checks at steps 5, 10, ...


def profiled_steps(run_dir, rank):
    """The ProfilerStep#N marks in a rank's trace, and whether it holds the steps' operators."""
    with open(trace_path(str(run_dir), rank)) as f:
        names = {e.get("name", "") for e in json.load(f)["traceEvents"]}
    return sorted(n for n in names if n.startswith("ProfilerStep#")), "aten::mm" in names


def check_report(run_dir, steps, **expected_html):
    """The report renders, its curves on a non-blank PNG, and the page holds what it should."""
    assert run_report([str(run_dir)]) == 0
    png = os.path.join(run_dir, "report", "curves.png")
    assert pixels(png).std() > 0.05 and curve_pixels(png) > 1500
    with open(os.path.join(run_dir, "report", "report.html")) as f:
        page = f.read()
    assert f"<td>{steps}</td>" in page  # the summary's step count
    for what, text in expected_html.items():
        assert text in page, what
    return page


def test_one_rank_profiles_its_window_and_reports(tmp_path, cache_dir):
    """One rank: no peers, so no straggler check (nothing gathered); the window's trace."""
    run_dir = tmp_path / "run"
    out = check_ok(run_ranks(gpt(run_dir, cache_dir, "train.train_iters=6",
                                 "logging.profile_steps=3-4",
                                 f"logging.straggler_interval={INTERVAL}"), 1))
    assert profiled_steps(run_dir, 0) == (["ProfilerStep#3", "ProfilerStep#4"], True)
    assert "profile of steps 3-4: a Chrome trace per rank" in out
    assert read_metrics(run_dir, "straggler") == []
    check_report(run_dir, 6, layout="TP1 x PP1 x DP1 (ZeRO-1), 1 rank")


def test_a_slowed_rank_is_named_after_a_clean_stretch_names_none(tmp_path, cache_dir):
    """2 ranks, 20 clean steps (checks at 5, 10, 15, 20: no straggler at the default margin,
    0.5), profiled at steps 2-3 on both ranks; then resumed with rank 1 sleeping 0.5 s at the
    start of steps 21-30 (~15x a step here): rank 1 is named at 25 and 30, on this host, behind
    in data, on rank 0's console and in metrics.jsonl, and the resumed run's report shows it."""
    run_dir = tmp_path / "run"
    common = ["train.train_iters=30", "checkpoint.save_interval=0",
              f"logging.straggler_interval={INTERVAL}"]
    check_ok(run_ranks(gpt(run_dir, cache_dir, *common, "train.exit_at_step=20",
                           "logging.profile_steps=2-3"), 2))
    assert read_metrics(run_dir, "straggler") == []  # no false straggler in 20 clean steps
    for rank in (0, 1):
        assert profiled_steps(run_dir, rank) == (["ProfilerStep#2", "ProfilerStep#3"], True)
    check_report(run_dir, 20, layout="TP1 x PP1 x DP2 (ZeRO-1), 2 ranks",
                 stragglers="<h3>Stragglers</h3><p>none</p>")

    results = run_ranks(gpt(run_dir, cache_dir, *common), 2,
                        extra_env={FAULT_ENV: "slow_step:1:21-30"})
    out = check_ok(results)
    rows = read_metrics(run_dir, "straggler")
    assert [(r["step"], r["rank"], r["section"]) for r in rows] == [(25, 1, "data"),
                                                                      (30, 1, "data")], rows
    host = socket.gethostname()
    assert all(r["host"] == host and r["first_step"] == r["step"] - INTERVAL + 1
               and r["slowdown"] > 3 and r["ratio"] > 10 and 0.45 < r["late_s"] < 1.0
               for r in rows), rows
    assert f"straggler: rank 1 on {host} made steps 21-25" in out
    assert "it fell behind in data" in out
    check_report(run_dir, 30, restart="<td>rerun</td>", straggler=f"<td>{host}</td><td>data</td>")
