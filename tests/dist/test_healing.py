"""Self-healing runs (training/healing.py): loss spikes rolled back in the running process, a
spike that comes back skipped past, a third one stopping the run; a flipped bit in one replica
named and rolled back. The faults come from resilience/faults.py (loss_spike, bitflip); each
run is compared, per step, with one that met no fault."""
import json

import pytest

from magneto_dist.errors import ExitCode
from magneto_dist.training.metrics_file import last_per_step

from .gpt_runs import check_ok, gpt
from .ranks import run_ranks

SPIKE_AT = 14  # the global batch the loss_spike fault scales (judged: warm-up 2 + window 10)
SHORT = ["train.train_iters=16", "checkpoint.save_interval=4", "checkpoint.keep_last=10"]


def rows(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def losses(run_dir):
    """{step: loss}, the last occurrence of each step (a replay's rows follow a resume row)."""
    return {r["step"]: r["loss"] for r in last_per_step(rows(run_dir), "train")}


def events(run_dir, split="spike"):
    return [(r["step"], r["action"]) for r in rows(run_dir) if r["split"] == split]


def spike_run(run_dir, cache_dir, policy, faults, *extra, once_dir=None):
    env = {"MAGNETO_DIST_FAULT": faults} if faults else {}
    if once_dir:
        env["MAGNETO_DIST_FAULT_ONCE_DIR"] = str(once_dir)
    return run_ranks(gpt(run_dir, cache_dir, *SHORT, f"train.spike_policy={policy}", *extra), 1,
                     extra_env=env)


def test_spike_policies_on_a_transient_bad_batch(tmp_path, cache_dir):
    """rollback: a spike that does not come back on the replay leaves the run equal to one that
    never met it, bit for bit. warn: a row, and the same losses as off, which writes none."""
    check_ok(spike_run(tmp_path / "clean", cache_dir, "off", None))
    clean = losses(tmp_path / "clean")
    fault = f"loss_spike:0:{SPIKE_AT}"
    out = check_ok(spike_run(tmp_path / "rollback", cache_dir, "rollback", fault,
                             once_dir=tmp_path / "once"))
    assert f"loss spike at step {SPIKE_AT}: back to " in out and "in this process" in out
    assert events(tmp_path / "rollback") == [(SPIKE_AT, "rollback"), (SPIKE_AT, "transient")]
    resumes = [r for r in rows(tmp_path / "rollback") if r["split"] == "resume"]
    assert [(r["step"], r["tag"]) for r in resumes] == [(12, "global_step12")], resumes
    assert losses(tmp_path / "rollback") == clean
    check_ok(spike_run(tmp_path / "warn", cache_dir, "warn", fault))
    check_ok(spike_run(tmp_path / "off", cache_dir, "off", fault))
    assert events(tmp_path / "warn") == [(SPIKE_AT, "warn")] and events(tmp_path / "off") == []
    warned = losses(tmp_path / "warn")
    assert warned == losses(tmp_path / "off") and warned[SPIKE_AT] > 3 * clean[SPIKE_AT]


def test_a_persistent_spike_is_skipped_and_a_third_stops_the_run(tmp_path, cache_dir):
    """The spike at batch 14 comes back on the replay: batches 13-16 are skipped (the window of
    4 around it), recorded, and the steps after it equal a run resumed from the same checkpoint
    with those batches skipped by hand. The bad batch 19 then spikes a third time within 4 steps:
    exit 5 (not retried), the last checkpoint untouched."""
    run_dir = tmp_path / "run"
    (res,) = spike_run(run_dir, cache_dir, "rollback", f"loss_spike:0:{SPIKE_AT},loss_spike:0:19",
                       "train.spike_skip_steps=4")
    assert res.returncode == ExitCode.SPIKES, res.output[-3000:]
    assert "stopped: a third loss spike within train.spike_skip_steps=4 steps" in res.output
    assert events(run_dir) == [(SPIKE_AT, "rollback"), (SPIKE_AT, "skip"), (SPIKE_AT, "skip_data"),
                               (15, "stop")]
    (skipped,) = [r for r in rows(run_dir) if r.get("action") == "skip_data"]
    assert skipped["skipped_samples"] == [96, 128] and skipped["before_step"] == 13
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "global_step12"
    # the reference: global_step12 resumed in another run directory, 4 batches skipped by hand
    ref = tmp_path / "ref"
    (ref / "checkpoints").mkdir(parents=True)
    (ckpts / "global_step12").rename(ref / "checkpoints" / "global_step12")
    out = check_ok(run_ranks(gpt(ref, cache_dir, *SHORT, "train.spike_policy=rollback",
                                 "train.spike_skip_steps=4", "checkpoint.resume=global_step12",
                                 "checkpoint.resume_skip_batches=4"), 1))
    assert "skipping samples 96-127 (4 global batches)" in out
    after = losses(ref)
    assert sorted(after) == [13, 14, 15, 16]
    healed = losses(run_dir)
    assert [healed[s] for s in (13, 14)] == [after[s] for s in (13, 14)]


BITFLIP = ["train.train_iters=8", "checkpoint.save_interval=2", "checkpoint.keep_last=10",
           "train.replica_check_interval=2", "train.spike_policy=off"]


@pytest.mark.parametrize("world,layout", [
    (2, ["train.zero_stage=1"]), (2, ["train.zero_stage=3"]),
    (4, ["train.zero_stage=1", "parallel.tensor_model_parallel_size=2"])],
    ids=["dp2-zero1", "dp2-zero3", "tp2-dp2-zero1"])
def test_a_flipped_bit_is_named_and_rolled_back(tmp_path, cache_dir, world, layout):
    """A bit of one weight of DP rank 1 (global rank 1 without TP, 2 under TP2) flipped at the
    start of step 5, once (a memory fault, not a bad chip): the check before it names that
    rank, the run goes back to the checkpoint of the last check that agreed (step 2) and ends
    equal to a run that met no fault."""
    check_ok(run_ranks(gpt(tmp_path / "clean", cache_dir, *BITFLIP, *layout), world))
    bad = 1 if world == 2 else 2
    out = check_ok(run_ranks(gpt(tmp_path / "run", cache_dir, *BITFLIP, *layout), world,
                             extra_env={"MAGNETO_DIST_FAULT": f"bitflip:{bad}:5",
                                        "MAGNETO_DIST_FAULT_ONCE_DIR": str(tmp_path / "once")}))
    assert f"silent corruption at step 4: rank {bad} on " in out
    mismatches = [r for r in rows(tmp_path / "run") if r["split"] == "replica_mismatch"]
    assert {(r["rank"], r["step"], r["last_agreed"]) for r in mismatches} == {(bad, 4, 2)}
    assert mismatches[0]["host"]
    assert losses(tmp_path / "run") == losses(tmp_path / "clean")
    # global_step4, saved after the last check that agreed, was marked damaged, then saved
    # again by the replay: every tag is complete, none is left marked
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.parent.name for p in ckpts.glob("*/complete.json")) == \
        [f"global_step{s}" for s in (2, 4, 6, 8)]
    assert not list(ckpts.glob("*/damaged.json"))


def test_a_replay_that_differs_is_a_hardware_fault_naming_the_rank(tmp_path, cache_dir):
    """DP rank 1's weights are corrupted once, at the start of step 13 (the first after the
    save of step 12); the bad batch 14 spikes on rank 0 and the run goes back to step 12. The
    replay of step 13 from the same state and batch gives another loss than its first run:
    not the data but a rank's hardware. Rank 1 (whose own loss differs) is named and every
    rank exits 6, which the launcher retries."""
    run_dir = tmp_path / "run"
    env = {"MAGNETO_DIST_FAULT": f"bitflip:1:13,loss_spike:0:{SPIKE_AT}",
           "MAGNETO_DIST_FAULT_ONCE_DIR": str(tmp_path / "once")}
    results = run_ranks(gpt(run_dir, cache_dir, *SHORT, "train.spike_policy=rollback",
                            "train.zero_stage=1"), 2, extra_env=env)
    for res in results:
        assert res.returncode == ExitCode.HARDWARE, res.output[-3000:]
    assert ExitCode.HARDWARE.retried
    out = results[0].output
    assert "stopped: a hardware fault, not the data: step 13 re-run from the checkpoint of " \
           "step 12 (the same batch, the same state) gave loss" in out
    assert "rank 1 on " in out and "computed another result" in out
    (fault,) = [r for r in rows(run_dir) if r.get("action") == "hardware_fault"]
    assert fault["step"] == 13 and fault["ranks"] == [1] and fault["hosts"][0]
    assert events(run_dir) == [(SPIKE_AT, "rollback"), (13, "hardware_fault")]
