"""train.compile=blocks through launch/pretrain_gpt.py: the start-up line and row carry the
compile time, and resume stays bit-exact between compiled runs. (Compiled losses against eager
on the layout table: tests/dist/test_layouts.py; every norm scheme:
tests/test_compile_blocks.py.)"""
from .gpt_runs import check_ok, gpt, read_metrics
from .ranks import run_ranks

# The blocks of tests/dist/layout_worker.py's default case (d=32, FFN 64, 16 tokens, micro-batch
# 2, learned positions): one cold compile of that block then serves both files through torch's
# compile cache. Only CI time depends on it.
COMPILE = ["train.compile=blocks", "model.hidden_size=32", "model.ffn_hidden_size=64",
           "model.max_seq_len=16", "model.position=learned", "train.micro_batch_size=2"]


def test_compiled_resume_is_exact_and_start_up_reports_the_compile_time(tmp_path, cache_dir):
    """10 compiled steps with a save at step 5; a second process resumes that save and retrains
    steps 6-10 bit for bit. Each process's start-up line says how long compiling took. (Two
    processes, not three: each compiles, and compiling is what these tests pay for.)"""
    run = gpt(tmp_path, cache_dir, *COMPILE, "train.train_iters=10",
              "checkpoint.save_interval=5")
    out = check_ok(run_ranks(run, 1))
    assert "train.compile=blocks: 2 transformer blocks compile at the first step" in out
    assert "s from the command to the end of step 1 (compiling " in out
    out = check_ok(run_ranks(run + ["checkpoint.resume=global_step5"], 1))
    assert "resumed from" in out and "step 5, 40 samples consumed" in out  # 5 x 8
    assert "s from the command to the end of step 6 (compiling " in out
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [*range(1, 11), *range(6, 11)]
    assert [r["loss"] for r in rows[10:]] == [r["loss"] for r in rows[5:10]]
    startups = read_metrics(tmp_path, "startup")
    assert [r["step"] for r in startups] == [1, 6]
    for startup in startups:
        assert 0 < startup["compile_seconds"] < startup["startup_seconds"], startup
