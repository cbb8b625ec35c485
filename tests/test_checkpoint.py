"""Checkpoint bookkeeping that needs no engine: resume choice, pruning, compatibility."""
import json

import pytest

from magneto_dist.checkpoint import manager as ckpt
from magneto_dist.config import dump_config, load_config


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
