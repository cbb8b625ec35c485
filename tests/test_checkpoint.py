"""Checkpoint bookkeeping that needs no engine: resume choice, pruning, compatibility, content
digests, disk space, the data position's sizing, ranks that disagree on the resume tag."""
import errno
import json
import shutil
from collections import namedtuple

import pytest

from magneto_dist import errors
from magneto_dist.checkpoint import integrity, reshard, resume, space, storage
from magneto_dist.checkpoint import tags as ckpt
from magneto_dist.checkpoint.tags import CheckpointDir
from magneto_dist.data.datasets import train_samples
from magneto_dist.config import dump_config, load_config
from magneto_dist.dims import ParallelDims


def at(root, name):
    return CheckpointDir(str(root)).tag(name)


def make_tags(root, complete, incomplete=()):
    for step in complete:
        (root / f"global_step{step}").mkdir()
        (root / f"global_step{step}" / ckpt.COMPLETE).write_text(json.dumps({"step": step}))
    for step in incomplete:
        (root / f"global_step{step}").mkdir()


def test_resume_takes_newest_complete_and_warns_about_newer_incomplete(tmp_path):
    make_tags(tmp_path, complete=[2, 4, 10], incomplete=[12, 14])
    warnings = []
    assert resume.find_resume_tag(CheckpointDir(str(tmp_path)), "auto",
                                  log=warnings.append) == "global_step10"
    assert len(warnings) == 2 and "skipping incomplete checkpoint" in warnings[0]
    assert resume.find_resume_tag(CheckpointDir(str(tmp_path)), "none") is None
    assert resume.find_resume_tag(CheckpointDir(str(tmp_path)), "global_step4") == "global_step4"
    with pytest.raises(ckpt.CheckpointError, match="global_step12 is missing or incomplete"):
        resume.find_resume_tag(CheckpointDir(str(tmp_path)), "global_step12")
    assert resume.find_resume_tag(CheckpointDir(str(tmp_path / "absent")), "auto") is None


def test_prune_keeps_last_k_complete_and_newer_partial_saves(tmp_path):
    make_tags(tmp_path, complete=[2, 4, 6, 8], incomplete=[3, 9])
    CheckpointDir(str(tmp_path)).prune(keep_last=2)
    # older than the kept ones go (complete or not); a newer incomplete one may be in progress
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step6", "global_step8",
                                                          "global_step9"]


def test_incompatible_model_is_refused_with_fields_but_dropout_may_change(tmp_path):
    (tmp_path / "global_step5").mkdir()
    dump_config(load_config(None, ["model.num_layers=2"]),
                str(tmp_path / "global_step5" / "config.yaml"))
    resume.check_compatible(at(tmp_path, "global_step5"),
                            load_config(None, ["model.num_layers=2", "model.dropout=0.1"]))
    with pytest.raises(ckpt.CheckpointError,
                       match=r"model.norm: checkpoint 'magneto', config 'pre_ln'; "
                             r"model.num_layers: checkpoint 2, config 3\. Use a new"):
        resume.check_compatible(at(tmp_path, "global_step5"),
                                load_config(None, ["model.num_layers=3", "model.norm=pre_ln"]))


def save_tag(root, step, files, cfg=None, world_size=1):
    """A complete tag as save() leaves it: files, the resolved config, a marker with sizes."""
    tag_dir = root / f"global_step{step}"
    tag_dir.mkdir()
    for name, data in files.items():
        (tag_dir / name).write_bytes(data)
    dump_config(cfg or load_config(None, []), str(tag_dir / "config.yaml"))
    marker = {"step": step, "world_size": world_size,
              "layout": ParallelDims.of(cfg or load_config(None, []), world_size).layout,
              "files": ckpt.record_tag(str(tag_dir))}
    (tag_dir / ckpt.COMPLETE).write_text(json.dumps(marker))
    return tag_dir


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path):
    """A complete-marked tag whose model file was cut short (a crash while a rerun rewrote it)
    used to be chosen, and every resume then died with EOFError."""
    save_tag(tmp_path, 2, {"mp_rank_00_model_states.pt": b"x" * 100})
    newest = save_tag(tmp_path, 4, {"mp_rank_00_model_states.pt": b"x" * 100})
    (newest / "mp_rank_00_model_states.pt").write_bytes(b"")
    lines = []
    assert resume.find_resume_tag(CheckpointDir(str(tmp_path)), "auto",
                                  log=lines.append) == "global_step2"
    assert [line for line in lines if "WARNING" in line] == [
        f"WARNING: skipping damaged checkpoint {tmp_path}/global_step4: "
        f"{newest}/mp_rank_00_model_states.pt has 0 bytes, 100 when saved"]
    with pytest.raises(ckpt.CheckpointError, match="checkpoint.resume='global_step4' is damaged"):
        resume.find_resume_tag(CheckpointDir(str(tmp_path)), "global_step4")
    (newest / "mp_rank_00_model_states.pt").unlink()
    assert at(tmp_path, "global_step4").damage().endswith("is missing")


def test_unmark_makes_a_tag_incomplete_before_it_is_rewritten(tmp_path):
    """...and drops the tag's universal form, which would describe the old contents."""
    tag_dir = save_tag(tmp_path, 4, {"a.pt": b"1"})
    (tag_dir / ckpt.UNIVERSAL / "zero").mkdir(parents=True)
    (tag_dir / "b.pt.tmp4242").write_bytes(b"half")  # left by a writer killed mid-file
    at(tmp_path, "global_step4").unmark()
    assert not at(tmp_path, "global_step4").is_complete()
    assert not (tag_dir / ckpt.UNIVERSAL).exists() and (tag_dir / "a.pt").exists()
    # the temp would be recorded as a file of the rewritten tag, and stay there for good
    assert sorted(p.name for p in tag_dir.iterdir()) == ["a.pt", "config.yaml"]
    at(tmp_path, "global_step4").unmark()  # nothing to remove: fine


def lay(tp=1, pp=1, dp=1, zero=1):
    return {"tp": tp, "pp": pp, "dp": dp, "zero_stage": zero}


def test_layout_changes_deepspeed_cannot_load_are_refused_with_the_route_that_works():
    assert reshard.refusal(lay(tp=2, zero=3), lay(zero=3)) is None  # TP2 ZeRO-3 -> TP1
    assert reshard.refusal(lay(dp=2, zero=1), lay(dp=2, zero=3)) is None
    assert reshard.refusal(lay(tp=2, pp=2), lay(dp=4)) is None
    message = reshard.refusal(lay(), lay(tp=2, zero=3))
    assert message.startswith("DeepSpeed's ZeRO-3 loader cannot re-slice tensor-parallel "
                              "parameters; resume with train.zero_stage=1 (or 2) at TP2")
    assert message.endswith("resume on 1 rank(s) with parallel.tensor_model_parallel_size=1 "
                            "parallel.pipeline_model_parallel_size=1 train.zero_stage=1")
    for before, now in ((lay(zero=0), lay(dp=2, zero=0)), (lay(tp=2), lay(tp=2, zero=0))):
        assert reshard.refusal(before, now).startswith(
            "a layout change needs ZeRO's partitioned optimizer state on both sides")


def test_layout_of_a_checkpoint_older_than_the_layout_record(tmp_path):
    """Markers written before the layout was recorded: the saved config and world size say it."""
    tag_dir = save_tag(tmp_path, 5, {}, cfg=load_config(None, ["train.zero_stage=3",
                                                         "train.global_batch_size=32"]),
                       world_size=4)
    marker = json.loads((tag_dir / ckpt.COMPLETE).read_text())
    del marker["layout"], marker["files"]
    (tag_dir / ckpt.COMPLETE).write_text(json.dumps(marker))
    assert at(tmp_path, "global_step5").layout() == {"tp": 1, "pp": 1, "dp": 4,
                                                     "zero_stage": 3}
    assert at(tmp_path, "global_step5").damage() is None


def corrupt(path, offset=10, data=b"\xff" * 16):
    """Overwrite bytes inside a file, keeping its size (what a bad disk or a torn copy does)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_corruption_that_keeps_the_size_is_found_marked_and_skipped(tmp_path):
    """Random bytes inside a complete tag's optimizer file used to pass (sizes matched): the
    run resumed, trained on NaN and stopped with exit 4 blaming the data."""
    files = {"mp_rank_00_model_states.pt": b"m" * 300, "optim_states.pt": b"o" * 300}
    save_tag(tmp_path, 2, files)
    newest = save_tag(tmp_path, 4, files)
    corrupt(newest / "optim_states.pt")
    lines = []
    assert resume.find_resume_tag(CheckpointDir(str(tmp_path)), "auto",
                                  log=lines.append) == "global_step2"
    warning = [line for line in lines if "WARNING" in line]
    saved = integrity.file_digest(str(tmp_path / "global_step2" / "optim_states.pt"))
    assert warning == [f"WARNING: skipping damaged checkpoint {tmp_path}/global_step4: "
                       f"{newest}/optim_states.pt has other contents than when saved "
                       f"(xxh3_64 {integrity.file_digest(str(newest / 'optim_states.pt'))}, "
                       f"{saved} recorded) (marked damaged: damaged.json)"]
    assert any(line.startswith("verified the contents of global_step2 in ") for line in lines)
    # marked: every later run (and every other rank) skips it without reading it again
    assert not at(tmp_path, "global_step4").is_complete()
    assert "other contents" in json.loads((newest / ckpt.DAMAGED).read_text())["damage"]
    lines = []
    assert resume.find_resume_tag(CheckpointDir(str(tmp_path)), "auto",
                                  log=lines.append) == "global_step2"
    assert lines[0] == (f"WARNING: skipping damaged checkpoint {tmp_path}/global_step4 (marked "
                        "in damaged.json)")
    # a damaged tag newer than the kept one stays
    CheckpointDir(str(tmp_path)).prune(keep_last=1)
    assert (newest / "optim_states.pt").exists()


def test_each_rank_reads_its_share_of_the_files(tmp_path):
    """The content check reads every file once over all ranks, not once per rank; a rank
    whose share holds the damage marks the tag for the others."""
    files = {f"f{i}.pt": bytes([i]) * 100 for i in range(5)}
    tag_dir = save_tag(tmp_path, 4, files)
    names = sorted(json.loads((tag_dir / ckpt.COMPLETE).read_text())["files"])
    shares = [integrity.share(names, r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == names and all(shares)
    victim = shares[1][0]
    corrupt(tag_dir / victim, offset=0, data=b"\xfe")
    assert at(tmp_path, "global_step4").damage(share=(0, 3)) is None
    assert at(tmp_path, "global_step4").damage(share=None) is None  # sizes only
    assert victim in at(tmp_path, "global_step4").damage(share=(1, 3))


def test_a_marker_of_node_local_disks_checks_the_files_this_node_has(tmp_path):
    tag_dir = save_tag(tmp_path, 4, {"rank0.pt": b"a" * 10, "rank1.pt": b"b" * 10})
    marker = json.loads((tag_dir / ckpt.COMPLETE).read_text())
    (tag_dir / "rank1.pt").unlink()  # on the other node
    assert "rank1.pt is missing" in at(tmp_path, "global_step4").damage()
    (tag_dir / ckpt.COMPLETE).write_text(json.dumps(dict(marker, shared=False)))
    assert at(tmp_path, "global_step4").damage() is None
    corrupt(tag_dir / "rank0.pt", offset=0, data=b"x")
    assert "rank0.pt has other contents" in at(tmp_path, "global_step4").damage()


Usage = namedtuple("Usage", "total used free")


def test_a_save_the_disk_cannot_hold_is_refused_before_writing(tmp_path, monkeypatch):
    save_tag(tmp_path, 2, {"model.pt": b"x" * 5_000_000})
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 ** 9, 0, 4_000_000))
    message = space.space_shortfall(at(tmp_path, "global_step4"))
    assert message.startswith(f"no space left on {tmp_path} (needs about 5.0 MB for "
                              "global_step4, as global_step2 took; 4.0 MB free): nothing was "
                              "written."), message
    # rewriting a tag reuses its space; the first save has nothing to measure by
    assert space.space_shortfall(at(tmp_path, "global_step2")) is None
    assert space.space_shortfall(at(tmp_path / "fresh", "global_step2")) is None
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 ** 9, 0, 6_000_000))
    assert space.space_shortfall(at(tmp_path, "global_step4")) is None


@pytest.mark.parametrize("error", [RuntimeError("basic_ios::clear: iostream error"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . "
                                                "unexpected pos 661312 vs 661200"),
                                   OSError(errno.ENOSPC, "No space left on device")])
def test_a_write_that_fills_the_disk_is_a_no_space_error(tmp_path, monkeypatch, error):
    """torch's writer said "basic_ios::clear: iostream error" (exit 1, which the launcher
    retried forever); now: the directory, the size needed, exit 74, the partial tag unmarked."""
    save_tag(tmp_path, 2, {"model.pt": b"x" * 3_000_000})
    partial = tmp_path / "global_step4"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 ** 9, 0, 12_000))
    with pytest.raises(errors.NoSpaceError) as caught:
        with space.full_disk_as_no_space(at(tmp_path, "global_step4")):
            partial.mkdir()
            (partial / "model.pt").write_bytes(b"x" * 1000)
            raise error
    assert caught.value.exit_code == errors.ExitCode.NO_SPACE == 74
    assert str(caught.value).startswith(
        f"no space left on {tmp_path} (needs about 3.0 MB, as global_step2 took; 0.0 MB free) "
        "while saving global_step4 ("), str(caught.value)
    assert str(caught.value).endswith("global_step4 is not marked complete; free space (or "
                                      "lower checkpoint.keep_last) and rerun to resume from "
                                      "global_step2")
    assert errors.ExitCode.NO_SPACE in errors.NOT_RETRIED


def test_a_write_error_with_space_left_keeps_its_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 ** 12, 0, 10 ** 11))
    with pytest.raises(RuntimeError, match="a bug"):
        with space.full_disk_as_no_space(at(tmp_path, "global_step4")):
            raise RuntimeError("a bug")
    with pytest.raises(errors.NoSpaceError, match=r"needs more than the 0\.0 MB written"):
        with space.full_disk_as_no_space(at(tmp_path, "global_step4")):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")


def test_the_training_split_is_sized_from_the_data_position():
    """TP2 run to step 4 at 16 samples a step, resumed with train.global_batch_size=8: the
    split was sized train_iters x 8 = 80 while 64 were consumed, so step 7 raised
    StopIteration (and every restart did the same)."""
    assert train_samples(10, 16) == 160
    assert train_samples(10, 8, step=4, consumed=64) == 64 + 6 * 8
    assert train_samples(10, 8, step=4, consumed=64, at_least=160) == 160  # keeps the order
    assert train_samples(10, 32, step=4, consumed=64) == 64 + 6 * 32


def test_a_resume_that_changes_the_data_order_is_named(tmp_path):
    save_tag(tmp_path, 4, {}, cfg=load_config(None, ["train.seed=1"]))
    assert resume.data_order_changes(at(tmp_path, "global_step4"),
                                     load_config(None, ["train.seed=1"])) == []
    assert resume.data_order_changes(
        at(tmp_path, "global_step4"),
        load_config(None, ["train.seed=2", "data.split=98,1,1", "train.lr=1e-4"])) == [
        "train.seed: checkpoint 1, config 2", "data.split: checkpoint '969,30,1', config "
        "'98,1,1'"]


def view(host, tag, complete=True, damaged=False, missing=()):
    return {"host": host, "tag": tag, "complete": complete, "damaged": damaged,
            "missing": list(missing)}


def test_ranks_that_chose_another_resume_tag_are_named_by_host():
    """Node-local disks: rank 0 resumed while the other node (no complete.json there) started
    fresh, a hang or a silent divergence; now one error names the node and what it lacks."""
    files = ["a.pt", "b.pt", "c.pt"]
    error = storage._disagreement("/ckpt", "global_step4", [
        view("node-a", "global_step4"), view("node-a", "global_step4"),
        view("node-b", None, complete=False, missing=["a.pt", "b.pt"]),
        view("node-b", None, complete=False, missing=["a.pt", "b.pt"])], files)
    assert isinstance(error, errors.CheckpointError) and error.exit_code == 3
    assert str(error).startswith(
        "the ranks do not see the same checkpoints in /ckpt: rank 0 on node-a resumes "
        "global_step4; node-b (ranks 2-3) would start fresh: it lacks global_step4/complete.json "
        "and 2 of its 3 files (a.pt, b.pt). Every rank must see one checkpoint directory"), error
    error = storage._disagreement("/ckpt", None, [view("node-a", None), view("node-b",
                                                                             "global_step4")], [])
    assert "rank 0 on node-a resumes nothing (a fresh start); node-b (rank 1) would resume " \
           "global_step4." in str(error)


def test_a_tag_another_rank_found_damaged_or_a_stale_listing_needs_a_restart():
    damaged = storage._disagreement("/ckpt", "global_step4", [
        view("a", "global_step4", complete=False, damaged=True),
        view("a", "global_step2", complete=False, damaged=True)], ["x.pt"])
    assert isinstance(damaged, errors.RestartNeeded) and damaged.exit_code.retried
    assert "which another rank found damaged since" in str(damaged)
    stale = storage._disagreement("/ckpt", "global_step4", [
        view("a", "global_step4"), view("b", "global_step2")], ["x.pt"])
    assert isinstance(stale, errors.RestartNeeded) and "a stale directory listing" in str(stale)
    assert storage._ranks_text([0, 2, 3, 4, 7]) == "ranks 0, 2-4, 7"
