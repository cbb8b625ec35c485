"""Save in layout A, resume in layout B: each of steps 6-10 equals the straight 10-step run in
layout A within 1e-5 (fp32, same global batch and seed).

One straight run per layout A saves at step 5 (and 10); each B starts in a run directory of its
own holding only A's global_step5, so every loss it logs comes from the resumed state: weights,
both Adam moments, the LR schedule position, the step and the data position all have to be right
for steps 6-10 to match.
"""
import shutil

import pytest

from .gpt_runs import check_ok, gpt, read_metrics
from .ranks import run_ranks

TOLERANCE = 1e-5
COMMON = ["train.train_iters=10", "train.micro_batch_size=2", "checkpoint.save_interval=5",
          "checkpoint.keep_last=2"]


def layout(name, ranks, tp=1, pp=1, zero=1):
    return {"name": name, "ranks": ranks,
            "args": [f"parallel.tensor_model_parallel_size={tp}",
                     f"parallel.pipeline_model_parallel_size={pp}", f"train.zero_stage={zero}"]}


TP1, TP2, PP2 = layout("tp1", 1), layout("tp2", 2, tp=2), layout("pp2", 2, pp=2)
TP2_PP2, DP4, DP2 = layout("tp2_pp2", 4, tp=2, pp=2), layout("dp4", 4), layout("dp2", 2)
DP2_ZERO1, DP2_ZERO3 = layout("dp2_zero1", 2, zero=1), layout("dp2_zero3", 2, zero=3)
TP2_ZERO3, TP1_ZERO3 = layout("tp2_zero3", 2, tp=2, zero=3), layout("tp1_zero3", 1, zero=3)

PAIRS = [(TP2, TP1), (TP1, TP2), (PP2, TP1), (TP1, PP2), (TP2_PP2, DP4), (DP4, DP2),
         (DP2_ZERO1, DP2_ZERO3), (DP2_ZERO3, DP2_ZERO1), (TP2_ZERO3, TP1_ZERO3)]


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory, cache_dir):
    """Layout A's name -> its 10-step run directory (checkpoints at steps 5 and 10)."""
    runs = {}

    def get(a):
        if a["name"] not in runs:
            run_dir = tmp_path_factory.mktemp(f"straight_{a['name']}")
            check_ok(run_ranks(gpt(run_dir, cache_dir, *COMMON, *a["args"]), a["ranks"],
                               timeout=300))
            runs[a["name"]] = run_dir
        return runs[a["name"]]
    return get


@pytest.mark.parametrize("a,b", PAIRS, ids=[f"{a['name']}-to-{b['name']}" for a, b in PAIRS])
def test_resume_in_another_layout_continues_exactly(tmp_path, cache_dir, straight_runs, a, b):
    straight = straight_runs(a)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "global_step5",
                    resumed / "checkpoints" / "global_step5")
    out = check_ok(run_ranks(gpt(resumed, cache_dir, *COMMON, *b["args"]), b["ranks"],
                             timeout=300))
    assert "changing layouts: global_step5 was written by" in out, out[-3000:]
    assert "resumed from" in out and "step 5, 40 samples consumed" in out
    expected = {r["step"]: r["loss"] for r in read_metrics(straight)}
    got = {r["step"]: r["loss"] for r in read_metrics(resumed)}
    assert sorted(got) == [6, 7, 8, 9, 10]
    diffs = {step: abs(got[step] - expected[step]) for step in got}
    assert max(diffs.values()) < TOLERANCE, (diffs, got, expected)


def test_kill_during_conversion_then_rerun(tmp_path, cache_dir, straight_runs):
    """Killed while converting: no universal form is left that looks finished; the rerun
    removes the dead conversion's temp directory, converts again and continues exactly."""
    straight = straight_runs(TP2)
    resumed = tmp_path / "resumed"
    tag_dir = resumed / "checkpoints" / "global_step5"
    shutil.copytree(straight / "checkpoints" / "global_step5", tag_dir)
    args = gpt(resumed, cache_dir, *COMMON, *TP1["args"])
    (killed,) = run_ranks(args, 1, extra_env={"MAGNETO_DIST_FAULT": "kill_in_convert:0:5"})
    assert killed.returncode == 137, killed.output[-3000:]
    assert not (tag_dir / "universal").exists()
    assert [p.name for p in tag_dir.glob("universal.tmp-*")]  # what the kill left
    check_ok(run_ranks(args, 1))
    assert not list(tag_dir.glob("universal.tmp-*")) and (tag_dir / "universal").is_dir()
    expected = {r["step"]: r["loss"] for r in read_metrics(straight)}
    got = {r["step"]: r["loss"] for r in read_metrics(resumed)}
    assert sorted(got) == [6, 7, 8, 9, 10]
    assert max(abs(got[s] - expected[s]) for s in got) < TOLERANCE
