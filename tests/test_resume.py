"""The resume decision (checkpoint/resume.py) without an engine: each source a run can start
from, the data position and split size it resumes at, a finished run, the warnings it gives and
the refusals, on run directories laid out as a save leaves them."""
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from magneto_dist.checkpoint import export, resume
from magneto_dist.checkpoint.tags import COMPLETE, CheckpointDir, CheckpointError, record_tag
from magneto_dist.config import config_to_dict, dump_config, load_config
from magneto_dist.data.datasets import train_samples
from magneto_dist.dims import ParallelDims
from magneto_dist.model import build_model

SMALL = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4",
         "model.ffn_hidden_size=64", "model.max_seq_len=16", "model.vocab_size=50",
         "train.train_iters=10", "train.global_batch_size=16", "train.micro_batch_size=8"]
TOKENIZER = SimpleNamespace(sha256="a" * 64, identity={})  # the run's (none recorded yet)


def config(run_dir, *overrides):
    return load_config(None, SMALL + [f"logging.run_dir={run_dir}", *overrides])


def save(run_dir, step, cfg, world=1, consumed=None, train_size=None):
    """A complete tag as manager.save leaves it, written by `cfg` on `world` ranks."""
    tag_dir = run_dir / "checkpoints" / f"global_step{step}"
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"m" * 64)
    dump_config(cfg, str(tag_dir / "config.yaml"))
    t = cfg.train
    marker = {"step": step, "world_size": world, "layout": ParallelDims.of(cfg, world).layout,
              "consumed_samples": step * t.global_batch_size if consumed is None else consumed,
              "train_samples": train_size or t.train_iters * t.global_batch_size,
              "files": record_tag(str(tag_dir))}
    (tag_dir / COMPLETE).write_text(json.dumps(marker))
    return tag_dir


def plan(cfg, world=1, log=None):
    return resume.plan_resume(cfg, ParallelDims.of(cfg, world), TOKENIZER,
                              log=log or (lambda line: pytest.fail(f"said early: {line}")))


def test_a_run_without_checkpoints_starts_fresh(tmp_path):
    p = plan(config(tmp_path))
    assert (p.source, p.tag, p.step, p.consumed_samples) == (resume.FRESH, None, 0, 0)
    assert p.train_samples == 10 * 16 and p.finished is None and p.warnings == ()
    assert p.ckpts == CheckpointDir(str(tmp_path / "checkpoints"))
    assert resume.load_source(p, local_rank=0) is None


def test_checkpoint_resume_none_starts_fresh_beside_a_complete_tag(tmp_path):
    save(tmp_path, 4, config(tmp_path))
    p = plan(config(tmp_path, "checkpoint.resume=none"))
    assert (p.source, p.tag) == (resume.FRESH, None)


def test_the_same_layout_resumes_the_tag_itself_at_its_data_position(tmp_path):
    cfg = config(tmp_path)
    save(tmp_path, 2, cfg)
    save(tmp_path, 4, cfg, consumed=64)
    p = plan(cfg)
    assert (p.source, p.tag.name, p.step, p.consumed_samples) == (
        resume.SAME_LAYOUT, "global_step4", 4, 64)
    assert p.train_samples == 160 and p.finished is None and p.layouts is None
    assert resume.load_source(p, local_rank=0) == p.tag  # the engine loads the tag's own files


def test_another_layout_resumes_through_the_universal_form(tmp_path):
    save(tmp_path, 4, config(tmp_path), world=1)  # DP1, resumed on 2 ranks: DP2
    p = plan(config(tmp_path), world=2)
    assert (p.source, p.tag.name) == (resume.UNIVERSAL_FORM, "global_step4")
    assert p.layouts == ({"tp": 1, "pp": 1, "dp": 1, "zero_stage": 1},
                         {"tp": 1, "pp": 1, "dp": 2, "zero_stage": 1})


def test_a_layout_deepspeed_cannot_load_is_refused_after_the_warnings_found(tmp_path):
    save(tmp_path, 4, config(tmp_path, "train.zero_stage=0"))
    (tmp_path / "checkpoints" / "global_step6").mkdir()  # an interrupted save
    said = []
    with pytest.raises(CheckpointError, match=r"was written by layout TP1 x PP1 x DP1 "
                                              r"\(ZeRO-0\) and this run is TP1 x PP1 x DP2"):
        plan(config(tmp_path, "train.zero_stage=0"), world=2, log=said.append)
    skipped, verified = said
    assert skipped.startswith("WARNING: skipping incomplete checkpoint") and "global_step6" in \
        skipped
    assert verified.startswith("verified the contents of global_step4")


def test_init_from_starts_from_an_export_that_fits_and_refuses_one_that_does_not(tmp_path):
    cfg = config(tmp_path / "run")
    torch.manual_seed(0)
    out = tmp_path / "export"
    out.mkdir()
    save_file({n: p.detach().clone() for n, p in build_model(cfg.model).named_parameters()},
              str(out / export.WEIGHTS))
    (out / export.CONFIG).write_text(json.dumps({"model": config_to_dict(cfg)["model"]}))
    p = plan(config(tmp_path / "run", f"checkpoint.init_from={out}"))
    assert (p.source, p.tag, p.step, p.train_samples) == (resume.INIT_FROM, None, 0, 160)
    with pytest.raises(CheckpointError,
                       match="holds another model: model.num_layers: checkpoint 2, config 3"):
        plan(config(tmp_path / "run", f"checkpoint.init_from={out}", "model.num_layers=3"))


def test_a_tag_to_resume_wins_over_init_from(tmp_path):
    """checkpoint.init_from is unused when resuming: a restart of an init_from run resumes
    its own checkpoint (the export, even if gone since, is not read)."""
    save(tmp_path, 4, config(tmp_path))
    p = plan(config(tmp_path, f"checkpoint.init_from={tmp_path / 'gone'}"))
    assert (p.source, p.tag.name) == (resume.SAME_LAYOUT, "global_step4")


def test_a_tag_at_the_last_step_is_finished(tmp_path):
    save(tmp_path, 10, config(tmp_path))
    p = plan(config(tmp_path, "train.global_batch_size=32"))  # no "continuing at" for it
    assert p.finished == (f"run {tmp_path} is finished: global_step10 is at step 10, "
                          "train.train_iters=10; nothing to do. Raise train.train_iters to "
                          "train further, or use a new logging.run_dir")
    assert [w for w in p.warnings if not w.startswith("verified the contents")] == []
    staged = plan(config(tmp_path, "train.train_iters=20", "train.exit_at_step=10"))
    assert "train.exit_at_step=10" in staged.finished
    assert plan(config(tmp_path, "train.train_iters=20")).finished is None


def test_warnings_come_in_the_order_found_and_the_split_keeps_the_new_batch(tmp_path):
    save(tmp_path, 4, config(tmp_path, "train.seed=1"))
    (tmp_path / "checkpoints" / "global_step6").mkdir()  # an interrupted save
    p = plan(config(tmp_path, "train.seed=2", "train.global_batch_size=8"))
    skipped, verified, seed, batch = p.warnings
    assert skipped.startswith("WARNING: skipping incomplete checkpoint") and "global_step6" in \
        skipped
    assert verified.startswith("verified the contents of global_step4")
    assert seed.startswith("WARNING: train.seed: checkpoint 1, config 2: the samples come in "
                           "another order")
    assert batch == ("train.global_batch_size: checkpoint 16, config 8: continuing at sample "
                     "64, 8 per step")
    # 6 steps left at 8 a step from sample 64, but never fewer than the first run's 160
    assert p.train_samples == max(160, train_samples(10, 8, 4, 64))


def newest_of_two_damaged(run_dir, cfg):
    """global_step2, and global_step4 whose model file changed at the same size."""
    save(run_dir, 2, cfg)
    newest = save(run_dir, 4, cfg)
    with open(newest / "mp_rank_00_model_states.pt", "r+b") as f:
        f.write(b"x")
    return newest


def test_a_damaged_tag_is_skipped_and_this_ranks_finding_goes_to_warn(tmp_path):
    cfg = config(tmp_path)
    newest = newest_of_two_damaged(tmp_path, cfg)
    mine = []
    p = resume.plan_resume(cfg, ParallelDims.of(cfg, 1), TOKENIZER, warn=mine.append)
    assert p.tag.name == "global_step2" and len(mine) == 1
    assert mine[0].startswith(f"WARNING: skipping damaged checkpoint {newest}: ")
    assert not any("global_step4" in w for w in p.warnings)


def test_another_tokenizer_is_refused(tmp_path):
    save(tmp_path, 4, config(tmp_path))
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "identity.json").write_text(json.dumps(
        {"type": "SentencePieceTokenizer", "paths": {"tokenizer_model": "a.model"},
         "vocab_size": 50, "eod": 3, "sha256": "b" * 64}))
    other = SimpleNamespace(sha256="c" * 64, identity={
        "type": "SentencePieceTokenizer", "paths": {"tokenizer_model": "c.model"},
        "vocab_size": 50, "eod": 3, "sha256": "c" * 64})
    with pytest.raises(CheckpointError, match="was trained with tokenizer"):
        resume.plan_resume(config(tmp_path), ParallelDims.of(config(tmp_path), 1), other)
    fresh = resume.plan_resume(config(tmp_path, "checkpoint.resume=none"),
                               ParallelDims.of(config(tmp_path), 1), other)
    assert fresh.source == resume.FRESH  # a fresh start trains its own tokenizer's ids


def test_resume_point_reads_nothing_when_told_so(tmp_path):
    newest = newest_of_two_damaged(tmp_path, config(tmp_path))
    ckpts = CheckpointDir.of_run(str(tmp_path))
    assert resume.resume_point(ckpts, contents=False).step == 4  # sizes only: not read
    assert (newest / COMPLETE).exists()
    assert resume.resume_point(ckpts).name == "global_step2"  # read, found, marked
    assert not (newest / COMPLETE).exists()
    assert resume.resume_point(CheckpointDir.of_run(str(tmp_path / "none"))) is None
