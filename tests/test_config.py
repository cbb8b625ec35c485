"""Run config: YAML + overrides, every error names its key, checks happen before heavy work."""
import glob
import os
import re

import pytest
import torch
import yaml

from magneto_dist.launch_env import ROOT
from magneto_dist.config import Config, ConfigError, config_to_dict, dump_config, load_config, validate
from magneto_dist.launch_env import default_config
from magneto_dist.dims import ParallelDims
from magneto_dist.training.run import main
from magneto_dist.training.schedule import lr_at, make_scheduler


def test_yaml_booleans_in_a_string_key_read_as_off_and_on():
    """YAML 1.1 reads `off` as False: train.compile=off was refused as 'must be str'. Only
    keys with an `off` choice read booleans so: a prompt of `yes` is still refused."""
    assert load_config(None, ["train.compile=off"]).train.compile == "off"
    assert load_config(None, ["train.compile=blocks"]).train.compile == "blocks"
    assert load_config(None, ["train.spike_policy=off"]).train.spike_policy == "off"
    with pytest.raises(ConfigError, match="train.compile='on' must be off or blocks"):
        validate(load_config(None, ["train.compile=on"]), 1)
    with pytest.raises(ConfigError, match="logging.sample_prompt=True must be str"):
        load_config(None, ["logging.sample_prompt=yes"])


def test_overrides_parse_as_yaml_and_floats_without_dot():
    cfg = load_config(None, ["train.lr=3e-4", "model.num_layers=4", "data.prefixes=[a, b]",
                             "data.weights=[1, 3]", "train.exit_at_step=null",
                             "logging.tensorboard=false"])
    assert cfg.train.lr == 3e-4 and cfg.model.num_layers == 4
    assert cfg.data.prefixes == ["a", "b"] and cfg.data.weights == [1.0, 3.0]
    assert cfg.logging.tensorboard is False


@pytest.mark.parametrize("overrides,message", [
    (["train.lrr=1"], "unknown key train.lrr; known keys in train: adam_beta1"),
    (["trian.lr=1"], "unknown section 'trian'"),
    (["train.lr"], "is not section.key=value"),
    (["train.train_iters=abc"], "train.train_iters='abc' must be int"),
    (["model.norm=foo"], "model.norm='foo' is not one of post_ln"),
    (["model.hidden_size=30"], "model.hidden_size=30 is not divisible by model.num_heads=4"),
    (["data.weights=[1]"], "data.weights has 1 entries but data.prefixes has 0"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(load_config(None, overrides), world_size=1)


@pytest.mark.parametrize("overrides,world,message", [
    (["train.global_batch_size=12"], 2,
     "train.global_batch_size=12 is not divisible by train.micro_batch_size x data-parallel "
     "size = 8 x 2; use a multiple of 16"),
    (["parallel.tensor_model_parallel_size=2"], 3,
     "world size 3 is not divisible by tensor x pipeline parallel size 2 x 1"),
    (["parallel.tensor_model_parallel_size=3"], 3, "does not divide model.num_heads=4"),
    (["parallel.tensor_model_parallel_size=2", "model.num_heads=2", "model.hidden_size=64",
      "model.ffn_hidden_size=99"], 2,
     "parallel.tensor_model_parallel_size=2 does not divide model.ffn_hidden_size=99"),
    (["parallel.pipeline_model_parallel_size=2", "train.zero_stage=2", "model.num_layers=4"], 2,
     "train.zero_stage=2 with parallel.pipeline_model_parallel_size=2"),
    (["parallel.pipeline_model_parallel_size=2", "model.arch=encoder"], 2,
     "pipeline parallelism supports model.arch='decoder' only"),
    (["parallel.pipeline_partition=uniform"], 1, "must be parameters or layers"),
    (["parallel.pipeline_model_parallel_size=2", "train.zero_stage=3", "model.num_layers=4"], 2,
     "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only; use train.zero_stage=1"),
    (["parallel.pipeline_model_parallel_size=4", "model.num_layers=2"], 4,
     "more stages than model.num_layers=2"),
    (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel=true needs tensor "
     "parallelism (it splits the TP group's replicated regions along the sequence) but "
     "parallel.tensor_model_parallel_size=1: set tensor_model_parallel_size to 2 or more"),
    (["parallel.sequence_parallel=true", "parallel.tensor_model_parallel_size=2",
      "model.max_seq_len=127"], 2, "parallel.sequence_parallel=true splits each rank's sequence "
     "(model.max_seq_len=127) across the parallel.tensor_model_parallel_size=2 ranks, but it is "
     "not divisible by 2; use a model.max_seq_len that is a multiple of 2"),
    (["parallel.sequence_parallel=true", "parallel.tensor_model_parallel_size=4",
      "parallel.context_parallel_size=2", "model.max_seq_len=20"], 8,
     "(model.max_seq_len=20 / parallel.context_parallel_size=2) across the "
     "parallel.tensor_model_parallel_size=4 ranks, but it is not divisible by 4; use a "
     "model.max_seq_len that is a multiple of 8"),
    (["train.precision=fp16"], 1, "train.precision='fp16' needs a GPU"),
    (["train.precision=bf16", "train.zero_stage=0"], 1,
     "train.precision='bf16' with train.zero_stage=0"),
    (["train.compile=all"], 1, "train.compile='all' must be off or blocks"),
    (["parallel.timeout_minutes=0"], 1, "parallel.timeout_minutes=0 must be at least 1"),
    (["train.spike_policy=undo"], 1, "train.spike_policy='undo' must be off, warn or rollback"),
    (["train.spike_window=2"], 1, "train.spike_window=2 must be at least 3"),
    (["train.spike_grad_norm_factor=0.5"], 1, "train.spike_grad_norm_factor=0.5 must be above 1"),
    (["train.spike_policy=rollback", "train.replica_check_interval=5",
      "checkpoint.save_interval=0"], 1, "train.spike_policy=rollback and "
     "train.replica_check_interval=5 with checkpoint.save_interval=0: there would be no "
     "checkpoint to roll back to"),
    (["checkpoint.resume_skip_batches=4"], 1, "checkpoint.resume_skip_batches=4 needs "
     "checkpoint.resume set to the tag to skip from (e.g. global_step400), not 'auto'"),
    (["train.exit_at_step=500", "train.train_iters=100"], 1, "train.exit_at_step=500"),
    (["data.prefixes=[x]"], 1, "data.prefixes needs data.tokenizer_model"),
    (["data.split=90,10"], 1, "data.split='90,10' must be three comma-separated numbers"),
    (["logging.diagnostics_interval=5", "parallel.tensor_model_parallel_size=2"], 2,
     "logging.diagnostics_interval=5 needs the whole model on one rank (TP1 x PP1, ZeRO 0-2)"),
    (["parallel.tensor_model_parallel_size=2", "model.num_query_groups=1"], 2,
     "parallel.tensor_model_parallel_size=2 does not divide model.num_query_groups=1: tensor "
     "parallelism gives each rank whole key/value groups"),
    (["parallel.pipeline_model_parallel_size=4", "model.parametrization=mup",
      "model.mup_base_hidden_size=64"], 4,
     "parallel.pipeline_model_parallel_size=4 with model.parametrization='mup': a middle stage "
     "holds no embedding or head"),
    (["train.lr_decay_style=wsd"], 1, "train.lr_decay_style=wsd needs train.wsd_decay_iters"),
    (["train.lr_decay_style=wsd", "train.wsd_decay_iters=500", "train.train_iters=100"], 1,
     "train.wsd_decay_iters=500 must be between 1 and the 80 steps between the warm-up and"),
    (["train.wsd_decay_iters=10"], 1, "train.wsd_decay_iters=10 is only used by "
                                      "train.lr_decay_style=wsd (it is 'cosine')"),
    (["train.lr_decay_style=wsd", "train.wsd_decay_iters=10", "train.wsd_decay_style=exp"], 1,
     "train.wsd_decay_style='exp' must be linear, cosine or 1-sqrt"),
    (["train.lr_decay_style=step"], 1,
     "train.lr_decay_style='step' must be cosine, linear, constant or wsd"),
    (["train.z_loss=-1e-4"], 1, "train.z_loss=-0.0001 must be at least 0"),
    (["checkpoint.async_save=true", "deepspeed.checkpoint.writer.type=fast"], 1,
     "checkpoint.async_save=true writes the checkpoint files with the project's background "
     "writer, which takes the place of DeepSpeed's deepspeed.checkpoint.writer"),
    (["logging.straggler_interval=-1"], 1, "logging.straggler_interval=-1 must be >= 0"),
    (["logging.straggler_margin=0"], 1, "logging.straggler_margin=0.0 must be > 0"),
    (["logging.profile_steps=5-3"], 1, "logging.profile_steps='5-3' must be FIRST-LAST or one "
     "step, counted from 1 (e.g. 5-7)"),
    (["logging.profile_steps=0"], 1, "logging.profile_steps='0' must be FIRST-LAST"),
    (["logging.profile_steps=x-y"], 1, "logging.profile_steps='x-y' must be FIRST-LAST"),
    (["logging.profile_steps=150-250"], 1, "logging.profile_steps='150-250' ends after "
     "train.train_iters=200"),
    (["logging.memory_snapshot=true"], 1, "logging.memory_snapshot=true records over the "
     "profile window: set logging.profile_steps too"),
    (["logging.memory_snapshot=true", "logging.profile_steps=1-2"], 1,
     "logging.memory_snapshot=true records the CUDA caching allocator, and this machine has no "
     "GPU"),
])
def test_cross_field_validation(overrides, world, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(load_config(None, overrides), world_size=world)


def test_profile_steps_read_a_range_or_one_step():
    for text, window in (("3-4", (3, 4)), ("7", (7, 7)), ("", None)):
        cfg = load_config(None, [f"logging.profile_steps={text}"])
        validate(cfg, world_size=1)
        assert cfg.logging.profile_window == window


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  warmup: 10\n")
    with pytest.raises(ConfigError, match=rf"{bad}: unknown key train.warmup"):
        load_config(str(bad))
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1,\n")
    with pytest.raises(ConfigError, match=rf"{broken}: not valid YAML"):
        load_config(str(broken))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_main_refuses_bad_config_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written here
    assert main("gpt", ["train.micro_batch_size=3", "train.global_batch_size=16"]) == 2
    err = capsys.readouterr().err
    assert "config error: train.global_batch_size=16 is not divisible" in err
    assert main("gpt", ["model.arch=encoder"]) == 2
    assert "use launch/pretrain_bert.py" in capsys.readouterr().err
    assert main("gpt", ["parallel.sequence_parallel=true"]) == 2  # SP without TP
    assert "parallel.sequence_parallel=true needs tensor parallelism" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, str(out))
    assert load_config(str(out)) == cfg
    with open(out) as f:
        assert set(yaml.safe_load(f)) == {"model", "data", "train", "parallel", "checkpoint",
                                          "logging", "deepspeed"}


def test_lr_schedule_shapes():
    cfg = load_config(None, ["train.lr=1.0", "train.min_lr=0.1", "train.warmup_iters=10",
                             "train.train_iters=110"]).train
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)   # cosine midpoint
    assert lr_at(110, cfg) == pytest.approx(0.1)
    cfg.lr_decay_style = "linear"
    assert lr_at(35, cfg) == pytest.approx(1.0 - 0.9 * 0.25)
    cfg.lr_decay_style = "constant"
    assert lr_at(100, cfg) == 1.0


@pytest.mark.parametrize("shape,midpoint", [("linear", 0.5), ("cosine", 0.5),
                                            ("1-sqrt", 1 - 0.5 ** 0.5)])
def test_wsd_schedule_warms_up_stays_then_cools_down(shape, midpoint):
    """WSD: warm-up, the peak until the last wsd_decay_iters steps, then the cooldown's shape
    down to min_lr at the decay's end (Megatron's lr_wsd_decay_style)."""
    t = load_config(None, ["train.lr=1.0", "train.min_lr=0.1", "train.warmup_iters=10",
                           "train.train_iters=110", "train.lr_decay_style=wsd",
                           "train.wsd_decay_iters=20", f"train.wsd_decay_style={shape}"]).train
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert [lr_at(s, t) for s in (10, 50, 90)] == [1.0, 1.0, 1.0]  # stable
    assert lr_at(100, t) == pytest.approx(0.1 + 0.9 * midpoint)
    assert lr_at(110, t) == pytest.approx(0.1) and lr_at(500, t) == pytest.approx(0.1)
    assert all(lr_at(s + 1, t) <= lr_at(s, t) for s in range(90, 110))


def test_zero_lr_holds_the_weights_instead_of_dividing_by_zero():
    """train.lr=0 (weights held) used to end in ZeroDivisionError inside the scheduler."""
    t = load_config(None, ["train.lr=0", "train.min_lr=0"]).train
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=t.lr)
    scheduler = make_scheduler(optimizer, t)
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr() == [0.0]


def test_errors_name_the_override_not_the_file():
    """An override's mistake used to be blamed on the YAML file."""
    path = os.path.join(ROOT, "configs", "gpt_tiny_cpu.yaml")
    with pytest.raises(ConfigError, match=r"^override 'train\.lr=fast': train\.lr='fast' must be "
                                          r"float$"):
        load_config(path, ["model.num_layers=2", "train.lr=fast"])
    with pytest.raises(ConfigError, match=r"^override 'model\.num_heads=5': model\.hidden_size=256 "
                                          r"is not divisible by model\.num_heads=5"):
        load_config(path, ["model.num_heads=5"])
    # overrides that are only valid together are fine in either order
    cfg = load_config(path, ["model.hidden_size=96", "model.num_heads=3"])
    assert (cfg.model.hidden_size, cfg.model.num_heads) == (96, 3)


def test_a_short_run_needs_one_override():
    """train.train_iters=10 against the default config's 20 warm-up steps: warm up over all 10
    (the run says so), instead of an error asking for a second override."""
    cfg = load_config(os.path.join(ROOT, "configs", "gpt_tiny_cpu.yaml"), ["train.train_iters=10"])
    validate(cfg, world_size=1)
    assert [round(lr_at(s, cfg.train) / cfg.train.lr, 3) for s in (0, 9)] == [0.1, 1.0]
    with pytest.raises(ConfigError, match=r"train.exit_at_step=20 must be between 1 and "
                                          r"train.train_iters=10"):
        validate(load_config(None, ["train.train_iters=10", "train.exit_at_step=20"]), 1)


def test_deepspeed_section_merges_nests_overrides_and_refuses_project_keys():
    from magneto_dist.training.engine import check_deepspeed_section, deepspeed_config
    cfg = load_config(None, ["deepspeed.zero_optimization.overlap_comm=true",
                             "deepspeed.zero_optimization.reduce_bucket_size=1000000",
                             "deepspeed.wall_clock_breakdown=true", "train.zero_stage=2"])
    merged = deepspeed_config(cfg, ParallelDims.of(cfg, 2))
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True,
                                           "reduce_bucket_size": 1000000,
                                           "contiguous_gradients": False}  # CPU default
    kept = load_config(None, ["deepspeed.zero_optimization.contiguous_gradients=true"])
    assert deepspeed_config(kept, ParallelDims.of(kept, 1))["zero_optimization"][
        "contiguous_gradients"] is True  # the user's choice wins
    assert merged["wall_clock_breakdown"] is True and merged["gradient_accumulation_steps"] == 1
    check_deepspeed_section(cfg, ParallelDims.of(cfg, 2))  # DeepSpeed's own config class accepts it
    for override, owner in (("deepspeed.zero_optimization.stage=3", "train.zero_stage"),
                            ("deepspeed.train_batch_size=64", "train.global_batch_size"),
                            ("deepspeed.bf16.enabled=true", "train.precision"),
                            # returns before its files exist: a marker would cover missing files
                            ("deepspeed.checkpoint.writer.decoupled=true",
                             "checkpoint.async_save")):
        key = override.split("=")[0]
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)} is set by the project from "
                                              rf"{re.escape(owner)}; set that instead"):
            deepspeed_config(load_config(None, [override]), ParallelDims.of(cfg, 1))
    bad = load_config(None, ["deepspeed.zero_optimization.overlap_comm=maybe"])
    with pytest.raises(ConfigError, match="deepspeed: DeepSpeed rejects the merged config: .*"
                                          "overlap_comm"):
        check_deepspeed_section(bad, ParallelDims.of(bad, 1))
    typo = load_config(None, ["deepspeed.zero_optimization.overlap_com=true"])
    with pytest.raises(ConfigError, match="overlap_com.*Extra inputs are not permitted"):
        check_deepspeed_section(typo, ParallelDims.of(typo, 1))
    with pytest.raises(ConfigError, match="deepspeed.bf16 is not a mapping"):
        load_config(None, ["deepspeed.bf16=1", "deepspeed.bf16.enabled=true"])


def test_parallel_dims_is_the_one_source_of_dp_size_and_accumulation():
    cfg = load_config(None, ["parallel.tensor_model_parallel_size=2", "train.micro_batch_size=2",
                             "train.global_batch_size=16", "train.zero_stage=3"])
    dims = validate(cfg, world_size=8)
    assert (dims.tp, dims.pp, dims.dp, dims.world, dims.grad_accum) == (2, 1, 4, 8, 2)
    assert dims.layout == {"tp": 2, "pp": 1, "dp": 4, "zero_stage": 3}
    assert dims.describe() == "TP2 x PP1 x DP4 (ZeRO-3)"
    from magneto_dist.training.engine import deepspeed_config
    assert deepspeed_config(cfg, dims)["gradient_accumulation_steps"] == dims.grad_accum


@pytest.mark.parametrize("task", ["gpt", "bert"])
def test_default_configs_write_each_value_once(task):
    """A script's default config sets only what differs from the dataclass defaults: a value
    written in both places once drifted apart (300 vs 200 steps, warm-up 30 vs 20)."""
    with open(default_config(task), encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    defaults = config_to_dict(Config())
    restated = [f"{section}.{key}" for section, values in raw.items()
                for key, value in (values or {}).items()
                if section != "deepspeed" and defaults[section][key] == value]
    assert not restated, f"{default_config(task)} restates defaults: {restated}"


def test_sequence_parallel_pipeline_sends_whole_activations():
    """DeepSpeed's pipeline splits what a stage sends across the TP ranks, assuming they are
    equal; under SP they are not (the tp2_sp_pp2 layout rows drifted by 0.02 with it on)."""
    from magneto_dist.training.engine import deepspeed_config
    layout = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]
    sp = load_config(None, [*layout, "parallel.sequence_parallel=true"])
    pipeline = deepspeed_config(sp, validate(sp, world_size=4))["pipeline"]
    assert pipeline == {"pipe_partitioned": False, "grad_partitioned": False}
    plain = load_config(None, layout)
    assert "pipeline" not in deepspeed_config(plain, validate(plain, world_size=4))
    refused = load_config(None, [*layout, "parallel.sequence_parallel=true",
                                 "deepspeed.pipeline.pipe_partitioned=true"])
    with pytest.raises(ConfigError, match=r"^deepspeed.pipeline.pipe_partitioned is set by the "
                                          r"project from parallel.sequence_parallel"):
        deepspeed_config(refused, validate(refused, world_size=4))
