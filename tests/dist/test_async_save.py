"""checkpoint.async_save under the fault-tolerant launcher: a slow background write, kill -9 at
each moment of one, SIGTERM during one, then resume; judged against an uninterrupted run with
synchronous saves (losses bit for bit, and the last checkpoint's tensors)."""
import json

import torch

from magneto_dist.checkpoint.tags import CheckpointDir
from magneto_dist.config import load_config
from magneto_dist.dims import ParallelDims
from magneto_dist.training.memory_plan import Layout, MemoryPlanner

from .gpt_runs import TINY, check_ok
from .ranks import run_ranks
from .test_ft_launch import finish, ft_launch, incidents

COMMON = ["train.train_iters=10", "checkpoint.save_interval=2", "checkpoint.keep_last=1",
          "train.micro_batch_size=2", "train.global_batch_size=8"]


def script(run_dir, cache_dir, *overrides):
    return ["launch/pretrain_gpt.py", *TINY, f"data.cache_dir={cache_dir}",
            f"logging.run_dir={run_dir}", *COMMON, *overrides]


def planned_host_copy():
    """tools/plan_memory.py's host copy of rank 0 (DP rank 0 of 2, ZeRO-1) for this run."""
    cfg = load_config(None, [a for a in TINY + COMMON if not a.startswith("data.")]
                      + ["model.vocab_size=1024"])  # data.builtin_vocab_size
    planner = MemoryPlanner(cfg.model, "fp32", cfg.model.max_seq_len)
    layout = Layout(dims=ParallelDims.of(cfg, 2), recompute=False, micro_batch=2)
    return planner.plan(layout)["host_copy"]


def rows(run_dir, split):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


# Python's and numpy's global generators are never seeded (nothing in training draws from
# them), so their saved states differ between any two runs.
UNSEEDED = ("python", "numpy")


def tensors_equal(a, b, where=""):
    """The same nested structure with bit-equal tensors and equal other leaves."""
    if where.startswith("rng_rank") and where.endswith(UNSEEDED):
        return
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert sorted(a, key=str) == sorted(b, key=str), where
        for key in a:
            tensors_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            tensors_equal(x, y, f"{where}[{i}]")
    elif not callable(a) and type(a).__module__ in ("builtins", "numpy"):
        assert repr(a) == repr(b), where


def test_kills_and_sigterm_during_background_writes_resume_exactly(tmp_path, cache_dir):
    """Step 2's write is slow (rank 1's writer stalls 2 s): steps 3-4 change the live state
    meanwhile and step 4's save waits for it. Then, each at a save no earlier attempt reaches:
    rank 1 killed right after its snapshot of step 4, rank 0 killed once its first file of step
    6 is durable, SIGTERM to rank 1 during its write of step 8, rank 1 killed before step 10's
    marker. Each attempt resumes from the newest complete tag (keep_last=1: the last complete
    one was kept while a newer one was written), the SIGTERM ends with exit 75 after a
    complete checkpoint, and every step's loss equals the uninterrupted synchronous run's."""
    faults = ["slow_write:1:2", "kill_after_snapshot:1:4", "kill_mid_write:0:6",
              "sigterm_mid_write:1:8", "kill_in_save:1:10"]
    run_dir = tmp_path / "run"
    code, out = finish(ft_launch(script(run_dir, cache_dir, "checkpoint.async_save=true"),
                                 launcher_args=["--max-restarts", "6"],
                                 extra_env={"MAGNETO_DIST_FAULT": ",".join(faults),
                                            "MAGNETO_DIST_FAULT_ONCE_DIR": str(tmp_path / "once")}),
                       timeout=900)
    assert code == 0, out[-5000:]
    assert "the save of step 4 is due while global_step2 is still being written: waiting" in out
    first = rows(run_dir, "checkpoint")[0]
    assert (first["step"], first["waits"]) == (2, 1) and first["waited_s"] > 0, first
    assert abs(first["snapshot_bytes"] - planned_host_copy()) < 0.02 * first["snapshot_bytes"]
    causes = [(r["rank"], r["cause"]) for r in incidents(run_dir)]
    assert causes[:2] == [(1, "exit 137"), (0, "exit 137")], causes
    assert causes[2][1] == "exit 75" and causes[3:] == [(1, "exit 137")], causes
    # the SIGTERM stopped the run at step 8 or 9, with that step's checkpoint complete
    resumed = [r["tag"] for r in rows(run_dir, "resume")]
    assert resumed[:2] == ["global_step2", "global_step4"], resumed
    assert resumed[2:] in (["global_step8"] * 2, ["global_step9"] * 2), resumed
    reference = tmp_path / "reference"
    check_ok(run_ranks(script(reference, cache_dir), 2, timeout=300))
    losses = {r["step"]: r["loss"] for r in rows(run_dir, "train")}  # the last of each step
    assert losses == {r["step"]: r["loss"] for r in rows(reference, "train")}  # bit for bit
    ckpts, sync_ckpts = run_dir / "checkpoints", reference / "checkpoints"
    assert CheckpointDir(str(ckpts)).complete_tags() == ["global_step10"]  # keep_last=1
    tag = CheckpointDir(str(ckpts)).tag("global_step10")
    assert tag.damage() is None  # sizes and digests as recorded
    saved = sorted(tag.marker()["files"])
    assert saved == sorted(CheckpointDir(str(sync_ckpts)).tag("global_step10").marker()["files"])
    for name in saved:
        if name.endswith(".pt"):
            tensors_equal(torch.load(ckpts / "global_step10" / name, weights_only=False),
                          torch.load(sync_ckpts / "global_step10" / name, weights_only=False),
                          name)
