"""Save in layout A, resume in layout B: each of steps 6-10 equals the straight 10-step run in
layout A within 1e-5 (fp32, same global batch and seed).

One straight run per layout A saves at step 5 (and 10); each B starts in a run directory of its
own holding only A's global_step5, so every loss it logs comes from the resumed state: weights,
both Adam moments, the LR schedule position, the step and the data position all have to be right
for steps 6-10 to match.
"""
import os
import re
import subprocess
import sys
import time

import pytest

from magneto_dist.checkpoint import reshard

from .gpt_runs import check_ok, copy_tag, gpt, read_metrics
from .ranks import ROOT, kill_group, run_ranks, wait_ranks

TOLERANCE = 1e-5
COMMON = ["train.train_iters=10", "train.micro_batch_size=2", "checkpoint.save_interval=5",
          "checkpoint.keep_last=2"]


def layout(name, ranks, tp=1, pp=1, zero=1, *extra):
    return {"name": name, "ranks": ranks,
            "args": [f"parallel.tensor_model_parallel_size={tp}",
                     f"parallel.pipeline_model_parallel_size={pp}", f"train.zero_stage={zero}",
                     *extra]}


TP1, TP2, PP2 = layout("tp1", 1), layout("tp2", 2, tp=2), layout("pp2", 2, pp=2)
# saved in the background (step 5's files written while step 6 runs), pipeline layer files too;
# the straggler check gathers every 2 steps, under the pipeline too (it must not change a loss)
TP2_PP2 = layout("tp2_pp2", 4, 2, 2, 1, "checkpoint.async_save=true",
                 "logging.straggler_interval=2")
DP4, DP2 = layout("dp4", 4), layout("dp2", 2)
DP2_ZERO1, DP2_ZERO3 = layout("dp2_zero1", 2, zero=1), layout("dp2_zero3", 2, zero=3)
TP2_ZERO3, TP1_ZERO3 = layout("tp2_zero3", 2, tp=2, zero=3), layout("tp1_zero3", 1, zero=3)

# context parallelism changes no weight, only ZeRO's partitions (over DP x CP); packed
# documents masked, positions restarting, so the chunks' positions and masks must be right
DOCUMENTS = ("data.reset_attention_mask=true", "data.reset_position_ids=true",
             "data.eod_mask_loss=true")
CP2 = layout("cp2", 2, 1, 1, 1, "parallel.context_parallel_size=2", *DOCUMENTS)
CP1 = layout("cp1", 1, 1, 1, 1, *DOCUMENTS)
CP4 = layout("cp4", 4, 1, 1, 1, "parallel.context_parallel_size=4", *DOCUMENTS)

# today's options together (issue 32): muP's three optimizer groups (width 64 over a base of
# 32: the hidden matrices at half the LR), GQA's groups split over TP2, QK-norm, the z-loss and
# a WSD cooldown (steps 7-10) across the resume
MODERN = ("model.parametrization=mup", "model.mup_base_hidden_size=32", "model.qk_norm=true",
          "model.num_query_groups=2", "train.z_loss=1e-4", "train.lr_decay_style=wsd",
          "train.wsd_decay_iters=4")
MODERN_TP2 = layout("modern_tp2", 2, 2, 1, 1, *MODERN)
MODERN_PP2 = layout("modern_pp2", 2, 1, 2, 1, *MODERN)

# sequence parallelism changes no weight's shape or name: its checkpoint is TP2's, loaded as is
# at TP2 without SP (and TP2's with SP), converted like TP2's for TP1
TP2_SP = layout("tp2_sp", 2, 2, 1, 1, "parallel.sequence_parallel=true")

PAIRS = [(TP2, TP1), (TP1, TP2), (PP2, TP1), (TP1, PP2), (TP2_PP2, DP4), (DP4, DP2),
         (DP2_ZERO1, DP2_ZERO3), (DP2_ZERO3, DP2_ZERO1), (TP2_ZERO3, TP1_ZERO3),
         (CP2, CP1), (CP2, CP4), (TP2_SP, TP2), (TP2, TP2_SP), (TP2_SP, TP1),
         (MODERN_TP2, MODERN_PP2)]


@pytest.fixture
def straight_runs(shared_run, cache_dir):
    """Layout A -> its 10-step run directory (checkpoints at steps 5 and 10), made once per
    session: tests/dist/test_pretrain.py's same-layout resumes compare with the same runs."""
    return lambda a: shared_run(lambda run_dir: gpt(run_dir, cache_dir, *COMMON, *a["args"]),
                                a["ranks"])


@pytest.mark.parametrize("a,b", PAIRS, ids=[f"{a['name']}-to-{b['name']}" for a, b in PAIRS])
def test_resume_in_another_layout_continues_exactly(tmp_path, cache_dir, straight_runs, a, b):
    straight = straight_runs(a)
    resumed = tmp_path / "resumed"
    copy_tag(straight, resumed)
    out = check_ok(run_ranks(gpt(resumed, cache_dir, *COMMON, *b["args"]), b["ranks"],
                             timeout=300))
    same_shards = (a["ranks"], a["args"][:3]) == (b["ranks"], b["args"][:3])  # SP on or off
    assert ("changing layouts: global_step5 was written by" in out) != same_shards, out[-3000:]
    assert "resumed from" in out and "step 5, 40 samples consumed" in out
    expected = {r["step"]: r["loss"] for r in read_metrics(straight)}
    got = {r["step"]: r["loss"] for r in read_metrics(resumed)}
    assert sorted(got) == [6, 7, 8, 9, 10]
    diffs = {step: abs(got[step] - expected[step]) for step in got}
    assert max(diffs.values()) < TOLERANCE, (diffs, got, expected)
    if a is MODERN_TP2:  # muP's groups by name, in order, at their LRs after the resume
        groups = re.search(r"optimizer groups: (.*)", out).group(1)
        lrs = dict(re.findall(r"(\w+) lr=([0-9.e+-]+)", groups))
        assert list(lrs) == ["matrices", "vectors", "hidden_matrices"], groups
        assert float(lrs["hidden_matrices"]) == pytest.approx(float(lrs["matrices"]) / 2,
                                                              rel=1e-5), groups


def test_kill_during_conversion_then_rerun(tmp_path, cache_dir, straight_runs):
    """Killed while converting: no universal form is left that looks finished; the rerun
    removes the dead conversion's temp directory, converts again and continues exactly."""
    straight = straight_runs(TP2)
    resumed = tmp_path / "resumed"
    tag_dir = copy_tag(straight, resumed)
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


def test_a_damaged_universal_form_is_rebuilt(tmp_path, cache_dir, straight_runs):
    """One parameter file deleted from TAG/universal: the run said "reusing the universal form",
    exit 0, with that weight at its fresh init (step-5 loss 7.0105 instead of 7.0055), and the
    next tag was marked complete with it. Now the form is verified, rebuilt, and resumes
    exactly."""
    straight = straight_runs(TP2)
    resumed = tmp_path / "resumed"
    tag_dir = copy_tag(straight, resumed)
    args = gpt(resumed, cache_dir, *COMMON, *TP1["args"], "checkpoint.resume=global_step5")
    check_ok(run_ranks(args, 1))
    victim = tag_dir / "universal" / "zero" / "decoder.layers.0.ffn.fc1.weight" / "fp32.pt"
    victim.unlink()
    out = check_ok(run_ranks(args, 1))
    assert f"the universal form in {tag_dir}/universal cannot be reused: {victim} is missing; " \
           "converting again" in out, out[-3000:]
    assert victim.exists() and "reusing the universal form" not in out
    expected = {r["step"]: r["loss"] for r in read_metrics(straight)}
    got = {r["step"]: r["loss"] for r in read_metrics(resumed)}  # the last run's rows
    assert sorted(got) == [6, 7, 8, 9, 10]
    assert max(abs(got[s] - expected[s]) for s in got) < TOLERANCE


def node(ckpt_dir, local_rank, fault=None):
    """One node's local rank preparing a resume in another layout (convert_worker.py)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if fault:
        env["MAGNETO_DIST_FAULT"] = fault
    return subprocess.Popen([sys.executable, "tests/dist/convert_worker.py", str(ckpt_dir),
                             "global_step5", str(local_rank)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for_lock(lock, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not lock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)


@pytest.mark.parametrize("first_dies", [False, True], ids=["both-alive", "converter-killed"])
def test_one_converter_per_filesystem_and_a_dead_one_is_taken_over(tmp_path, straight_runs,
                                                                  first_dies):
    """Two nodes on one filesystem each converted the same tag at once (local rank 0 of every
    node), and their other ranks gave up after a fixed 1,800 s. Now one converts (it holds
    TAG/universal.lock) while the other node waits and reuses its result, or takes over when
    the converter was killed mid-way; a node's other rank waits for the result."""
    tag_dir = copy_tag(straight_runs(TP2), tmp_path)
    ckpt_dir = tag_dir.parent
    procs = [node(ckpt_dir, 0, fault="kill_in_convert:0:5" if first_dies else None)]
    try:
        if first_dies:  # the other node comes while the first holds the lock (or has died)
            wait_for_lock(tag_dir / "universal.lock", procs[0])
        procs += [node(ckpt_dir, 0), node(ckpt_dir, 1)]  # the other node; a loader rank
        a, b, loader = wait_ranks(procs, timeout=300)
    finally:
        for proc in procs:
            kill_group(proc)
    assert b.returncode == 0 and loader.returncode == 0, b.output[-3000:] + loader.output[-3000:]
    assert "ready to load" in loader.output
    if first_dies:
        assert a.returncode == 137, a.output[-3000:]
        assert (f"taking over the conversion: the converter on {os.uname().nodename} pid "
                f"{procs[0].pid} is gone") in b.output
    else:
        assert a.returncode == 0, a.output[-3000:]
        converted, waited = sorted([a.output, b.output], key=lambda o: "converting" not in o)
        assert "converting" in converted and "converting" not in waited
        assert "waiting for the conversion by" in waited or "reusing the universal" in waited
    assert sorted(p.name for p in tag_dir.glob("universal*")) == ["universal"]
    assert reshard.universal_problem(str(tag_dir / "universal"),
                                     reshard.source_identity(str(tag_dir))) is None
