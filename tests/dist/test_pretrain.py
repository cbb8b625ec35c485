"""launch/pretrain_gpt.py end to end: the default run, exact resume, incomplete checkpoints,
SIGTERM, metrics.jsonl, incompatible checkpoints. Ranks are real processes on gloo."""
import os
import signal
import subprocess
import sys

import pytest

from .gpt_runs import TINY, check_ok, copy_tag, gpt, read_metrics, wait_for_steps
from .ranks import ROOT, free_port, kill_group, run_ranks, start_ranks
from .test_reshard import (COMMON, CP2, DP2_ZERO1, DP2_ZERO3, TP1, TP1_ZERO3, TP2_PP2,
                           TP2_ZERO3, layout)


@pytest.mark.parametrize("ranks", [1, 2])
def test_default_run_through_deepspeed_cli(tmp_path, cache_dir, ranks):
    """The README's command (shortened): the default config, on 1 and 2 data-parallel ranks."""
    run_dir = tmp_path / "run"
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(ranks),
           "--master_port", str(free_port()), "launch/pretrain_gpt.py",
           "train.train_iters=24", "train.warmup_iters=4", "train.log_interval=4",
           "train.eval_interval=12", "train.eval_iters=2", "checkpoint.save_interval=12",
           "logging.sample_tokens=8", f"data.cache_dir={cache_dir}", f"logging.run_dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(2 // ranks), PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    train = read_metrics(run_dir)
    assert [r["step"] for r in train] == [4, 8, 12, 16, 20, 24]
    assert train[-1]["loss"] < train[0]["loss"] - 1.0, [r["loss"] for r in train]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in train)
    valid = read_metrics(run_dir, "valid")
    assert [r["step"] for r in valid] == [12, 24]
    (startup,) = read_metrics(run_dir, "startup")  # from the command to the end of step 1
    assert startup["step"] == 1 and 1 < startup["startup_seconds"] < 400, startup
    assert valid[1]["ppl"] == pytest.approx(2.718281828 ** valid[1]["loss"], rel=1e-6)
    assert "sample> def " in proc.stdout
    with open(run_dir / "checkpoints" / "latest") as f:
        assert f.read() == "global_step24"


TP2 = "parallel.tensor_model_parallel_size=2"


DROPOUT = "model.dropout=0.1"
SAME_LAYOUT = [TP1, TP1_ZERO3, DP2_ZERO1, DP2_ZERO3, TP2_ZERO3, TP2_PP2,
               layout("tp2_dropout", 2, 2, 1, 1, DROPOUT),
               layout("tp1_dropout", 1, 1, 1, 1, DROPOUT), CP2,
               layout("tp2_sp_dropout", 2, 2, 1, 1, "parallel.sequence_parallel=true", DROPOUT)]


@pytest.mark.parametrize("a", SAME_LAYOUT, ids=[a["name"] for a in SAME_LAYOUT])
def test_resume_is_exact(tmp_path, cache_dir, shared_run, a):
    """10 steps straight == its checkpoint of step 5 resumed, 5 more: every loss bit for bit.
    The straight runs are the session's (test_reshard.py resumes the same tags in other
    layouts); TP2 x PP2's was saved in the background, and resumes to the same bits."""
    straight = shared_run(lambda run_dir: gpt(run_dir, cache_dir, *COMMON, *a["args"]),
                          a["ranks"])
    resumed = tmp_path / "resumed"
    copy_tag(straight, resumed)
    out = check_ok(run_ranks(gpt(resumed, cache_dir, *COMMON, *a["args"]), a["ranks"]))
    assert "resumed from" in out and "step 5, 40 samples consumed" in out
    assert "changing layouts" not in out
    expected = [r["loss"] for r in read_metrics(straight)]
    assert [r["step"] for r in read_metrics(resumed)] == [6, 7, 8, 9, 10]
    assert [r["loss"] for r in read_metrics(resumed)] == expected[5:]  # same arithmetic


def test_a_run_stopped_at_a_step_resumes_in_its_directory_exactly(tmp_path, cache_dir,
                                                                  shared_run):
    """train.exit_at_step=5 saves and stops; the same command without it resumes in the same
    directory: the 10 losses equal the straight run's, bit for bit."""
    straight = shared_run(lambda run_dir: gpt(run_dir, cache_dir, *COMMON, *TP1["args"]), 1)
    staged = tmp_path / "staged"
    check_ok(run_ranks(gpt(staged, cache_dir, *COMMON, *TP1["args"], "train.exit_at_step=5"), 1))
    assert [r["step"] for r in read_metrics(staged)] == [1, 2, 3, 4, 5]
    out = check_ok(run_ranks(gpt(staged, cache_dir, *COMMON, *TP1["args"]), 1))
    assert "resumed from" in out and "step 5, 40 samples consumed" in out
    assert [r["loss"] for r in read_metrics(staged)] == [r["loss"] for r in read_metrics(straight)]


def test_incomplete_checkpoint_is_never_chosen(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = gpt(run_dir, cache_dir, "train.train_iters=6", "checkpoint.save_interval=3")
    results = run_ranks(args, 2, extra_env={"MAGNETO_DIST_FAULT": "kill_in_save:1:6"})
    assert results[1].returncode == 137
    assert results[0].returncode != 0
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "global_step6").is_dir() and not (ckpts / "global_step6" / "complete.json").exists()
    with open(ckpts / "latest") as f:
        assert f.read() == "global_step3"
    out = check_ok(run_ranks(args, 2))
    assert "skipping incomplete checkpoint" in out and "global_step6" in out
    assert "resumed from" in out and "step 3, 24 samples consumed" in out
    assert (ckpts / "global_step6" / "complete.json").exists()


def test_resume_with_a_smaller_global_batch_finishes(tmp_path, cache_dir):
    """16 samples a step to step 4, then resumed with train.global_batch_size=8: the training
    split was sized train_iters x 8 = 80 while 64 were consumed, so step 7 raised StopIteration
    (and so did every restart, and every later resume from that tag). A resume that changes
    the sample order is named."""
    run_dir = tmp_path / "run"
    check_ok(run_ranks(gpt(run_dir, cache_dir, "train.train_iters=10",
                           "train.global_batch_size=16", "train.exit_at_step=4"), 1))
    out = check_ok(run_ranks(gpt(run_dir, cache_dir, "train.train_iters=10",
                                 "checkpoint.save_interval=3"), 1))
    assert "step 4, 64 samples consumed" in out
    assert ("train.global_batch_size: checkpoint 16, config 8: continuing at sample 64, 8 per "
            "step") in out
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert rows[-1]["consumed_samples"] == 64 + 6 * 8
    out = check_ok(run_ranks(gpt(run_dir, cache_dir, "train.train_iters=12", "train.seed=7",
                                 "data.split=949,50,1"), 1))
    assert "step 10, 112 samples consumed" in out
    assert ("WARNING: train.seed: checkpoint 1234, config 7: the samples come in another order "
            "than the checkpoint's run drew them") in out
    assert "WARNING: data.split: checkpoint '969,30,1', config '949,50,1'" in out


def test_sigterm_saves_and_exits_with_distinct_code(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = gpt(run_dir, cache_dir, "train.train_iters=100000", "checkpoint.save_interval=0")
    (proc,) = start_ranks(args, 1)
    try:
        wait_for_steps(run_dir, proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        kill_group(proc)
    assert proc.returncode == 75, out[-3000:]
    assert "stopped by SIGTERM" in out
    step = read_metrics(run_dir)[-1]["step"]
    assert (run_dir / "checkpoints" / f"global_step{step}" / "complete.json").exists()


def test_incompatible_checkpoint_is_refused(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    check_ok(run_ranks(gpt(run_dir, cache_dir, "train.train_iters=2"), 1))
    (res,) = run_ranks(gpt(run_dir, cache_dir, "train.train_iters=4", "model.num_layers=3"), 1)
    assert res.returncode == 3
    assert "was written by a different model; model.num_layers: checkpoint 2, config 3" in res.output


def test_bert_masked_lm_trains(tmp_path, cache_dir):
    run_dir = tmp_path / "bert"
    args = ["launch/pretrain_bert.py", *TINY, "model.arch=encoder", "model.position=learned",
            "train.train_iters=30", "train.lr=5e-3", f"data.cache_dir={cache_dir}",
            f"logging.run_dir={run_dir}"]
    check_ok(run_ranks(args, 1))
    losses = [r["loss"] for r in read_metrics(run_dir)]
    assert len(losses) == 30 and sum(losses[-3:]) / 3 < losses[0] - 0.5, losses


def test_tp2_checkpoint_converts_to_universal_and_matches_tp1(tmp_path, cache_dir):
    """DeepSpeed's ds_to_universal merges a TP2 checkpoint (vocab padded 1000 -> 1024) into full
    parameters equal to the same run's TP1 weights: the universal info in the client state is
    right, and TP2 trained exactly like TP1."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    common = ["train.train_iters=3", "data.builtin_vocab_size=1000"]
    check_ok(run_ranks(gpt(tmp_path / "tp1", cache_dir, *common), 1))
    check_ok(run_ranks(gpt(tmp_path / "tp2", cache_dir, *common, TP2), 2))
    out = tmp_path / "universal"
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                           "--input_folder", str(tmp_path / "tp2/checkpoints/global_step3"),
                           "--output_folder", str(out), "--num_extract_workers", "1",
                           "--num_merge_workers", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reference = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "tp1/checkpoints"),
                                                         tag="global_step3")
    assert len(reference) > 20
    # A tied alias (lm_head.weight is embed.word.weight) is one parameter: compare it once. The
    # converter writes a single TP slice under the alias name; loading goes by the owner's name.
    owned = {id(w): name for name, w in reversed(list(reference.items()))}
    assert "lm_head.weight" not in owned.values()
    for name, weight in reference.items():
        if owned[id(weight)] != name:
            continue
        merged = torch.load(out / "zero" / name / "fp32.pt", weights_only=False)["param"]
        assert merged.shape == weight.shape, name
        # TP sums in another order (~1e-6), and Adam turns that noise in near-zero gradients into
        # up to ~lr (3e-3) per step; a mis-merged slice (order, dimension) is off by ~0.1.
        torch.testing.assert_close(merged, weight, rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_bf16_under_tp2_tracks_fp32(tmp_path, cache_dir):
    """DeepSpeed's bf16 optimizer path with TP (bf16 activations, fp32 master weights, fp32
    norms and CE): the loss curve stays within bf16 rounding of the fp32 single-process one."""
    common = ["train.train_iters=12"]
    check_ok(run_ranks(gpt(tmp_path / "fp32", cache_dir, *common), 1))
    check_ok(run_ranks(gpt(tmp_path / "bf16", cache_dir, *common, TP2, "train.precision=bf16"), 2))
    fp32 = [r["loss"] for r in read_metrics(tmp_path / "fp32")]
    bf16 = [r["loss"] for r in read_metrics(tmp_path / "bf16")]
    assert len(bf16) == 12 and bf16 != fp32  # really ran in another precision
    assert max(abs(a - b) for a, b in zip(bf16, fp32)) < 0.05, (bf16, fp32)
    assert bf16[-1] < bf16[0] - 0.3


def test_diagnostics_leave_training_bit_identical(tmp_path, cache_dir):
    """logging.diagnostics_interval measures on a probe batch under a forked RNG, in eval mode,
    through autograd.grad: with dropout on, the losses equal a run without it, bit for bit."""
    common = ["train.train_iters=6", "model.dropout=0.1"]
    check_ok(run_ranks(gpt(tmp_path / "plain", cache_dir, *common), 1))
    check_ok(run_ranks(gpt(tmp_path / "diag", cache_dir, *common,
                           "logging.diagnostics_interval=2"), 1))
    assert ([r["loss"] for r in read_metrics(tmp_path / "diag")]
            == [r["loss"] for r in read_metrics(tmp_path / "plain")])
    rows = read_metrics(tmp_path / "diag", "diagnostics")
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    assert rows[0]["model_update"] == 0.0 and rows[-1]["model_update"] > 0
    assert all(len(r["grad_norm_per_layer"]) == 2 for r in rows)
