"""What the disk does to checkpoints: contents damaged at the same size, a full disk during a
save (a real one: a small tmpfs), and node-local disks, simulated as two "nodes" on this
machine whose ranks each see their own run directory."""
import json
import os
import subprocess
import sys

import pytest

from .gpt_runs import check_ok, gpt, read_metrics
from .ranks import ROOT, free_port, rank_env, run_ranks, wait_ranks
from .test_ft_launch import final_losses, finish, ft_launch, script


def test_contents_damaged_at_the_same_size_fall_back_to_the_previous_tag(tmp_path, cache_dir):
    """64 KiB of random bytes inside a complete tag's optimizer file: the run resumed from it,
    trained on NaN and stopped with exit 4, telling the user to check the data or lower the LR.
    Now the rank whose share of the files holds it finds it, the tag is marked damaged, and the
    run (restarted by the launcher when the other rank had already chosen the tag) resumes
    from the previous one: steps 5 and 6, redone, equal the first run's bit for bit."""
    run_dir, steps = tmp_path / "run", "train.train_iters=8"
    check_ok(run_ranks(script(run_dir, cache_dir, steps, "train.exit_at_step=6"), 2))
    uninterrupted = final_losses(run_dir)  # steps 1-6, before any damage
    victim = run_dir / "checkpoints" / "global_step6" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(victim, "r+b") as f:  # rank 1's share of the six files
        f.seek(100_000)
        f.write(os.urandom(64 * 1024))
    code, out = finish(ft_launch(script(run_dir, cache_dir, steps)))
    assert code == 0, out[-5000:]
    assert (f"rank 1: WARNING: skipping damaged checkpoint {run_dir}/checkpoints/global_step6: "
            f"{victim} has other contents than when saved") in out
    if "restart needed: " in out:  # rank 0 had chosen the tag before rank 1 marked it
        assert f"skipping damaged checkpoint {run_dir}/checkpoints/global_step6 (marked in " \
               "damaged.json)" in out
    assert "resumed from" in out and "step 4, 32 samples consumed" in out
    resumed = final_losses(run_dir)
    assert sorted(resumed) == list(range(1, 9))
    assert {s: resumed[s] for s in uninterrupted} == uninterrupted  # steps 5-6 redone exactly


@pytest.fixture
def small_disk():
    """make(path, size): path becomes a tmpfs of that size (mounting needs root; elsewhere the
    unit tests in tests/test_checkpoint.py cover the same paths with a patched disk)."""
    mounted = []

    def make(path, size):
        path.mkdir(parents=True)
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(path)
        return path
    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_mid_save_exits_74_and_the_launcher_does_not_retry(tmp_path, cache_dir,
                                                                     small_disk):
    """The first save (2.7 MB) onto a 2 MB filesystem: torch's writer failed with "unexpected
    pos" / "basic_ios::clear: iostream error", exit 1, and the launcher retried it forever."""
    run_dir = tmp_path / "run"
    ckpts = small_disk(run_dir / "checkpoints", "2m")
    code, out = finish(ft_launch(gpt(run_dir, cache_dir, "train.train_iters=2"), nproc=1))
    assert code == 74, out[-4000:]
    assert f"no space: no space left on {ckpts} (needs more than the " in out
    assert "written before it ran out; 0.0 MB free) while saving global_step2 (" in out
    assert ("global_step2 is not marked complete; free space (or lower checkpoint.keep_last) and "
            "rerun to resume from the start") in out
    assert "not restarting: rank 0 exited 74 (no space left on the checkpoint filesystem)" in out
    assert not (ckpts / "global_step2" / "complete.json").exists()
    rows = [json.loads(line) for line in (run_dir / "restarts.jsonl").read_text().splitlines()]
    assert [r["cause"] for r in rows] == ["exit 74"], rows


def test_a_save_the_disk_cannot_hold_is_refused_before_writing_and_nothing_is_lost(
        tmp_path, cache_dir, small_disk):
    run_dir = tmp_path / "run"
    ckpts = small_disk(run_dir / "checkpoints", "4m")
    args = gpt(run_dir, cache_dir, "train.train_iters=4", "checkpoint.save_interval=2")
    (res,) = wait_ranks([subprocess.Popen([sys.executable, *args], cwd=ROOT,
                                          env=rank_env(0, 1, free_port()), text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          start_new_session=True)], timeout=300)
    assert res.returncode == 74, res.output[-3000:]
    assert (f"no space: no space left on {ckpts} (needs about 2.7 MB for global_step4, as "
            "global_step2 took; 1.") in res.output
    assert "nothing was written. Free space (or lower checkpoint.keep_last) and rerun; the run " \
           "resumes from global_step2" in res.output
    assert not (ckpts / "global_step4").exists()
    subprocess.run(["mount", "-o", "remount,size=16m", str(ckpts)], check=True)
    out = check_ok(wait_ranks([subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=rank_env(0, 1, free_port()), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)], 300))
    assert "resumed from" in out and "step 2, 16 samples consumed" in out
    assert (ckpts / "global_step4" / "complete.json").exists()


def start_node_ranks(args_per_rank, extra_env=None):
    """One process per rank, each with its own arguments (its node's run directory)."""
    port = free_port()
    return [subprocess.Popen([sys.executable, *args], cwd=ROOT,
                             env=rank_env(rank, len(args_per_rank), port, extra_env),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
            for rank, args in enumerate(args_per_rank)]


def test_node_local_disks_are_named_and_a_resume_from_them_is_refused(tmp_path, cache_dir):
    """Rank 0 ("node A") and rank 1 ("node B") each see their own run directory, as nodes with
    local disks do. Rank 0 alone writes complete.json, so node B saw no checkpoint and started
    fresh while rank 0 resumed: a hang or a silent divergence. Now the run says at start that
    the directory is not shared, and a resume stops on every rank (exit 3) naming the node and
    what it lacks."""
    node_dirs = [tmp_path / "node_a", tmp_path / "node_b"]
    common = ["train.micro_batch_size=4", "train.global_batch_size=8", "checkpoint.save_interval=2"]
    results = wait_ranks(start_node_ranks(
        [gpt(d, cache_dir, *common, "train.train_iters=2") for d in node_dirs]), 300)
    out = check_ok(results)
    assert (f"WARNING: {node_dirs[0]}/checkpoints is not shared by all nodes: ") in out
    assert " (rank 1) do not see rank 0's files. Training and saving work, but a restart " in out
    tag_a, tag_b = (d / "checkpoints" / "global_step2" for d in node_dirs)
    marker = json.loads((tag_a / "complete.json").read_text())
    assert marker["shared"] is False and not (tag_b / "complete.json").exists()
    # each node holds its own ranks' files; the marker records both nodes' files
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in marker["files"]
    assert (tag_b / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()
    assert not (tag_a / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()

    results = wait_ranks(start_node_ranks(
        [gpt(d, cache_dir, *common, "train.train_iters=4") for d in node_dirs]), 300)
    assert [r.returncode for r in results] == [3, 3], results[0].output[-3000:]
    message = results[0].output
    assert (f"checkpoint error: the ranks do not see the same checkpoints in {node_dirs[0]}/"
            "checkpoints: rank 0 on ") in message
    assert " resumes global_step2; " in message
    assert (" (rank 1) would start fresh: it lacks global_step2/complete.json and 4 of its 6 "
            "files (") in message, message[-3000:]
    assert "put logging.run_dir on a filesystem that all nodes share" in message
    assert [r["step"] for r in read_metrics(node_dirs[0])] == [1, 2]  # nothing trained
