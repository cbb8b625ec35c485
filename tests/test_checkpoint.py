"""Checkpoint bookkeeping that needs no engine: resume choice, pruning, compatibility."""
import json

import pytest

from magneto_dist.checkpoint import manager as ckpt
from magneto_dist.checkpoint import reshard
from magneto_dist.config import dump_config, load_config
from magneto_dist.dims import ParallelDims


def make_tags(root, complete, incomplete=()):
    for step in complete:
        (root / f"global_step{step}").mkdir()
        (root / f"global_step{step}" / ckpt.COMPLETE).write_text(json.dumps({"step": step}))
    for step in incomplete:
        (root / f"global_step{step}").mkdir()


def test_resume_takes_newest_complete_and_warns_about_newer_incomplete(tmp_path):
    make_tags(tmp_path, complete=[2, 4, 10], incomplete=[12, 14])
    warnings = []
    assert ckpt.find_resume_tag(str(tmp_path), "auto", log=warnings.append) == "global_step10"
    assert len(warnings) == 2 and "skipping incomplete checkpoint" in warnings[0]
    assert ckpt.find_resume_tag(str(tmp_path), "none") is None
    assert ckpt.find_resume_tag(str(tmp_path), "global_step4") == "global_step4"
    with pytest.raises(ckpt.CheckpointError, match="global_step12 is missing or incomplete"):
        ckpt.find_resume_tag(str(tmp_path), "global_step12")
    assert ckpt.find_resume_tag(str(tmp_path / "absent"), "auto") is None


def test_prune_keeps_last_k_complete_and_newer_partial_saves(tmp_path):
    make_tags(tmp_path, complete=[2, 4, 6, 8], incomplete=[3, 9])
    ckpt.prune(str(tmp_path), keep_last=2)
    # older than the kept ones go (complete or not); a newer incomplete one may be in progress
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step6", "global_step8",
                                                          "global_step9"]


def test_incompatible_model_is_refused_with_fields_but_dropout_may_change(tmp_path):
    (tmp_path / "global_step5").mkdir()
    dump_config(load_config(None, ["model.num_layers=2"]),
                str(tmp_path / "global_step5" / "config.yaml"))
    ckpt.check_compatible(str(tmp_path), "global_step5",
                          load_config(None, ["model.num_layers=2", "model.dropout=0.1"]))
    with pytest.raises(ckpt.CheckpointError,
                       match=r"model.norm: checkpoint 'magneto', config 'pre_ln'; "
                             r"model.num_layers: checkpoint 2, config 3\. Use a new"):
        ckpt.check_compatible(str(tmp_path), "global_step5",
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
              "files": ckpt._file_sizes(str(tag_dir))}
    (tag_dir / ckpt.COMPLETE).write_text(json.dumps(marker))
    return tag_dir


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path):
    """A complete-marked tag whose model file was cut short (a crash while a rerun rewrote it)
    used to be chosen, and every resume then died with EOFError."""
    save_tag(tmp_path, 2, {"mp_rank_00_model_states.pt": b"x" * 100})
    newest = save_tag(tmp_path, 4, {"mp_rank_00_model_states.pt": b"x" * 100})
    (newest / "mp_rank_00_model_states.pt").write_bytes(b"")
    warnings = []
    assert ckpt.find_resume_tag(str(tmp_path), "auto", log=warnings.append) == "global_step2"
    assert warnings == [f"WARNING: skipping damaged checkpoint {tmp_path}/global_step4: "
                        f"{newest}/mp_rank_00_model_states.pt has 0 bytes, 100 when saved"]
    with pytest.raises(ckpt.CheckpointError, match="checkpoint.resume='global_step4' is damaged"):
        ckpt.find_resume_tag(str(tmp_path), "global_step4")
    (newest / "mp_rank_00_model_states.pt").unlink()
    assert ckpt.damage(str(tmp_path), "global_step4").endswith("is missing")


def test_unmark_makes_a_tag_incomplete_before_it_is_rewritten(tmp_path):
    """...and drops the tag's universal form, which would describe the old contents."""
    tag_dir = save_tag(tmp_path, 4, {"a.pt": b"1"})
    (tag_dir / ckpt.UNIVERSAL / "zero").mkdir(parents=True)
    ckpt._unmark(str(tmp_path), "global_step4")
    assert not ckpt.is_complete(str(tmp_path), "global_step4")
    assert not (tag_dir / ckpt.UNIVERSAL).exists() and (tag_dir / "a.pt").exists()
    ckpt._unmark(str(tmp_path), "global_step4")  # nothing to remove: fine


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
    assert ckpt.saved_layout(str(tmp_path), "global_step5") == {"tp": 1, "pp": 1, "dp": 4,
                                                               "zero_stage": 3}
    assert ckpt.damage(str(tmp_path), "global_step5") is None
