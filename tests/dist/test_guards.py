"""Guards found by probing launch/pretrain_gpt.py with bad data, reruns, kills and signals. Each
test reproduces a failure of the code before the guard (a hang, a traceback, a run that trained
on inf, a checkpoint that looked complete but was not, ranks that ignored a stop)."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from magneto_dist.data.corpus import build_builtin_corpus
from .gpt_runs import check_ok, gpt, read_metrics, wait_for_steps
from .ranks import ROOT, free_port, kill_group, run_ranks

TP2 = "parallel.tensor_model_parallel_size=2"


def write_indexed(prefix, documents, vocab):
    """Random token ids below `vocab` as a Megatron .bin/.idx."""
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(documents):
        builder.add_document(rng.integers(0, vocab, size=64, dtype=np.uint16), [64])
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="module")
def tokenizer_1024(cache_dir):
    return build_builtin_corpus(cache_dir, 1024, log=lambda *a: None).tokenizer_model


@pytest.mark.parametrize("ranks,layout", [(1, []), (2, [TP2])], ids=["tp1", "tp2"])
def test_token_ids_beyond_the_vocabulary_stop_before_training(tmp_path, cache_dir,
                                                              tokenizer_1024, ranks, layout):
    """Data with ids up to 1999 and a 1024-piece tokenizer: TP1 died in the embedding with an
    IndexError, TP2 trained on inf loss, saved and exited 0."""
    prefix = write_indexed(str(tmp_path / "wide_text_document"), 1000, vocab=2000)
    args = gpt(tmp_path / "run", cache_dir, "train.train_iters=3", *layout,
               f"data.prefixes=[{prefix}]", f"data.tokenizer_model={tokenizer_1024}")
    for res in run_ranks(args, ranks, timeout=120):
        assert res.returncode == 2, res.output[-3000:]
        assert (f"data error: data prefix {prefix}: token id 1999 is outside the vocabulary of "
                f"data.tokenizer_model={tokenizer_1024} (1024 pieces)") in res.output
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_small_corpus_with_default_split_is_refused_not_hung(tmp_path, cache_dir, tokenizer_1024):
    """100 documents, split 969,30,1: megatron-core looped forever, printing nothing."""
    prefix = write_indexed(str(tmp_path / "small_text_document"), 100, vocab=1024)
    args = gpt(tmp_path / "run", cache_dir, "train.train_iters=3", f"data.prefixes=[{prefix}]",
               f"data.tokenizer_model={tokenizer_1024}", "data.split=969,30,1")
    (res,) = run_ranks(args, 1, timeout=120)
    assert res.returncode == 2, res.output[-3000:]
    assert "leaves the test split with no documents (100 in all" in res.output
    assert "use e.g. data.split=98,1,1" in res.output


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_a_non_finite_step_is_skipped(tmp_path, cache_dir, zero):
    """A NaN loss (so NaN gradients) at step 3 only. Without ZeRO, DeepSpeed applied the NaN
    update (every later loss NaN) and our optimizer guard skips it; ZeRO-1/2/3's optimizers skip
    it themselves. Either way the step is skipped: the model after step 3 is the model after
    step 2 (same validation loss, bit for bit) and training goes on."""
    args = gpt(tmp_path / "run", cache_dir, "train.train_iters=5", f"train.zero_stage={zero}",
               "train.eval_interval=1", "train.eval_iters=1")
    out = check_ok(run_ranks(args, 1, extra_env={"MAGNETO_DIST_FAULT": "nonfinite_loss:0:3"}))
    assert "WARNING: step 3: loss nan" in out and "update skipped (1 of" in out
    valid = [r["loss"] for r in read_metrics(tmp_path / "run", "valid")]
    assert valid[2] == valid[1] and valid[3] != valid[2], valid
    train = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert np.isnan(train[2]) and np.isfinite(train[3]) and np.isfinite(train[4])


def test_non_finite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(
        tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = gpt(run_dir, cache_dir, "train.train_iters=10", "checkpoint.save_interval=2",
               "train.max_nonfinite_steps=3")
    (res,) = run_ranks(args, 1, extra_env={"MAGNETO_DIST_FAULT": "nonfinite_loss:0:3-"})
    assert res.returncode == 4, res.output[-3000:]
    assert "stopped: steps 3-5 all had a non-finite loss or grad norm" in res.output
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("global_step*")) == ["global_step2"]
    assert (ckpts / "latest").read_text() == "global_step2"


def snapshot(run_dir):
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_rerun_of_a_finished_run_damaged_tag_and_other_layout(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = gpt(run_dir, cache_dir, "train.train_iters=4", "checkpoint.save_interval=2")
    check_ok(run_ranks(args, 1))
    # 1. A rerun of the finished command rewrote global_step4 in place; now it writes nothing.
    before = snapshot(run_dir)
    out = check_ok(run_ranks(args, 1))
    assert f"run {run_dir} is finished: global_step4 is at step 4, train.train_iters=4" in out
    assert snapshot(run_dir) == before
    # 2. A layout change DeepSpeed cannot load (TP2 under ZeRO-3): 172 lines of size mismatch,
    # and config.yaml overwritten; now one line naming the routes that work, exit 3, nothing
    # written.
    for res in run_ranks(gpt(run_dir, cache_dir, "train.train_iters=6", "train.zero_stage=3",
                             "parallel.tensor_model_parallel_size=2"), 2):
        assert res.returncode == 3, res.output[-3000:]
        assert ("was written by layout TP1 x PP1 x DP1 (ZeRO-1) and this run is TP2 x PP1 x DP1 "
                "(ZeRO-3): DeepSpeed's ZeRO-3 loader cannot re-slice tensor-parallel parameters; "
                "resume with train.zero_stage=1 (or 2) at TP2") in res.output
    assert snapshot(run_dir) == before
    # 3. A model file cut short in the newest complete tag: EOFError on every rerun; now the
    # previous tag is taken, with a warning, and the run continues from it.
    model_file = run_dir / "checkpoints" / "global_step4" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])
    out = check_ok(run_ranks(gpt(run_dir, cache_dir, "train.train_iters=6"), 1))
    assert "WARNING: skipping damaged checkpoint" in out and "has 100 bytes" in out
    assert "resumed from" in out and "step 2, 16 samples consumed" in out
    rows = read_metrics(run_dir, "resume")
    assert [(r["step"], r["tag"]) for r in rows] == [(2, "global_step2")]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 3, 4, 5, 6]


def test_kill_while_a_rerun_rewrites_a_complete_tag(tmp_path, cache_dir):
    """Resuming from global_step2 of a run that has global_step4 saves step 4 again. Killed
    mid-save, the tag used to keep its old complete.json over a mix of old and new files; now the
    marker goes first, and the next run falls back to global_step2 and matches the first run."""
    run_dir = tmp_path / "run"
    args = gpt(run_dir, cache_dir, "train.train_iters=4", "checkpoint.save_interval=2")
    check_ok(run_ranks(args, 2))
    first = [r["loss"] for r in read_metrics(run_dir)]
    results = run_ranks(args + ["checkpoint.resume=global_step2"], 2,
                        extra_env={"MAGNETO_DIST_FAULT": "kill_in_save:1:4"})
    assert results[1].returncode == 137
    assert not (run_dir / "checkpoints" / "global_step4" / "complete.json").exists()
    out = check_ok(run_ranks(args, 2))
    assert "skipping incomplete checkpoint" in out and "step 2, 16 samples consumed" in out
    rows = read_metrics(run_dir)
    assert [r["loss"] for r in rows[-2:]] == first[2:]  # steps 3 and 4, bit for bit


def session_processes(sid):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry))
    return pids


def test_sigterm_to_the_deepspeed_command_stops_the_ranks_and_a_second_run_is_refused(
        tmp_path, cache_dir):
    """DeepSpeed's runner exits 143 on SIGTERM and forwards nothing: the ranks trained on,
    unsupervised. Now they see their launcher go, save and exit 75."""
    run_dir = tmp_path / "run"
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "1",
           "--master_port", str(free_port()),
           *gpt(run_dir, cache_dir, "train.train_iters=100000", "checkpoint.save_interval=0")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = open(tmp_path / "deepspeed.log", "w")
    runner = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_for_steps(run_dir, runner)
        # a second run on the same run_dir is refused by the first one's lock
        (second,) = run_ranks(gpt(run_dir, cache_dir, "train.train_iters=100000"), 1)
        assert second.returncode == 2, second.output[-3000:]
        assert f"{run_dir} is in use by pid" in second.output
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=30)
        deadline = time.monotonic() + 90
        while session_processes(runner.pid):
            assert time.monotonic() < deadline, "ranks still running 90 s after the SIGTERM"
            time.sleep(0.5)
    finally:
        kill_group(runner)
        log.close()
    output = (tmp_path / "deepspeed.log").read_text()
    assert "stopped by launcher pid" in output, output[-3000:]
    step = read_metrics(run_dir)[-1]["step"]
    assert (run_dir / "checkpoints" / f"global_step{step}" / "complete.json").exists()
    assert not (run_dir / "run.lock").exists()
