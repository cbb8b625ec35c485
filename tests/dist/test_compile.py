"""train.compile=blocks through launch/pretrain_gpt.py: the start-up line and row carry the
compile time, and resume stays bit-exact between compiled runs. (Compiled losses against eager
on the layout table: tests/dist/test_layouts.py.)"""
from .gpt_runs import check_ok, gpt, read_metrics
from .ranks import run_ranks

COMPILE = "train.compile=blocks"


def test_compiled_resume_is_exact_and_start_up_reports_the_compile_time(tmp_path, cache_dir):
    """10 compiled steps straight == 5, stop, resume, 5 more, bit for bit; each process's
    start-up line says how long compiling took."""
    common = [COMPILE, "train.train_iters=10", "checkpoint.save_interval=0"]
    straight, staged = tmp_path / "straight", tmp_path / "staged"
    out = check_ok(run_ranks(gpt(straight, cache_dir, *common), 1))
    assert "train.compile=blocks: 2 transformer blocks compile at the first step" in out
    assert "s from the command to the end of step 1 (compiling " in out
    (startup,) = read_metrics(straight, "startup")
    assert 0 < startup["compile_seconds"] < startup["startup_seconds"], startup
    check_ok(run_ranks(gpt(staged, cache_dir, *common, "train.exit_at_step=5"), 1))
    out = check_ok(run_ranks(gpt(staged, cache_dir, *common), 1))
    assert "resumed from" in out and "step 5, 40 samples consumed" in out
    expected = [r["loss"] for r in read_metrics(straight)]
    assert len(expected) == 10 and [r["loss"] for r in read_metrics(staged)] == expected
    assert [r["step"] for r in read_metrics(staged, "startup")] == [1, 6]
