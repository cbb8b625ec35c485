"""Stability experiments: verdicts on synthetic curves, the sweep file, and the diagnostics
checked against a hand computation on a small model."""
import copy
import glob
import math
import os

import numpy as np
import pytest
import torch

from magneto_dist.config import ConfigError
from magneto_dist.launch_env import ROOT
from magneto_dist.model import ModelConfig, build_model
from magneto_dist.stability.grid import load_sweep
from magneto_dist.stability.report import variant
from magneto_dist.stability.sweep import drop_partial_line, read_rows
from magneto_dist.stability.verdicts import (VerdictConfig, count_spikes, early_divergence,
                                             judge, unigram_entropy)
from magneto_dist.training.diagnostics import Diagnostics
from magneto_dist.training.spikes import SpikeRule
from magneto_dist.training.tasks import GPTTask

RULES = VerdictConfig(above_start_steps=20, stuck_margin=0.1, spiky_count=3)
SPIKE = SpikeRule(window=10, loss_rise=1.0)  # the trainer's defaults but no warm-up
UNIGRAM = 5.7


def healthy(steps=300, seed=0):
    """Falls from ln(1024) to ~4 with batch noise of 0.2 nats, like the CPU miniature's cells."""
    rng = np.random.default_rng(seed)
    return list(4.0 + 2.9 * np.exp(-np.arange(steps) / 60) + rng.normal(0, 0.2, steps))


def test_a_healthy_noisy_curve_is_ok():
    verdict = judge(healthy(), UNIGRAM, RULES, SPIKE)
    assert verdict.verdict == "ok" and verdict.spikes == 0, verdict
    assert early_divergence(healthy(), RULES) is None


def test_non_finite_loss_is_diverged():
    curve = healthy(50) + [float("nan")] * 3
    assert early_divergence(curve, RULES) == "3 non-finite losses in a row (to step 53)"
    assert judge(curve, UNIGRAM, RULES, SPIKE).verdict == "diverged"
    assert judge(healthy(50) + [float("inf")], UNIGRAM, RULES, SPIKE).verdict == "diverged"


def test_loss_above_its_start_for_k_steps_is_diverged():
    curve = [6.9, 6.5, 6.0] + [7.5] * 19
    assert early_divergence(curve, RULES) is None
    curve.append(8.0)
    assert early_divergence(curve, RULES) == "loss above its start 6.900 for 20 steps (to step 23)"
    assert judge(curve, UNIGRAM, RULES, SPIKE).verdict == "diverged"


def test_plateau_at_the_unigram_entropy_is_stuck():
    rng = np.random.default_rng(1)
    curve = list(6.9 - 1.2 * (1 - np.exp(-np.arange(300) / 20)) + rng.normal(0, 0.1, 300))
    verdict = judge(curve, UNIGRAM, RULES, SPIKE)
    assert verdict.verdict == "stuck" and "unigram entropy 5.700" in verdict.reason
    assert judge(curve, None, RULES, SPIKE).verdict == "ok"  # no entropy known: not judged stuck


def test_spikes_are_counted_once_each_and_make_a_curve_spiky():
    curve = healthy(300)
    for at in (100, 101, 150, 200):  # 100-101 is one spike of two steps
        curve[at] += 2.0
    spikes, largest = count_spikes(curve, SPIKE)
    assert spikes == 3 and 1.5 < largest < 3.0
    assert judge(curve, UNIGRAM, RULES, SPIKE).verdict == "spiky"
    assert judge([], UNIGRAM, RULES, SPIKE).verdict == "crashed"


def test_unigram_entropy_in_nats():
    assert unigram_entropy(np.full(1024, 7)) == pytest.approx(math.log(1024))
    assert unigram_entropy(np.array([5, 0, 0])) == 0.0


def test_sweep_file_overrides_and_errors(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("grid: {schemes: [post_ln], depths: [2], lrs: [0.001], steps: 5}\n"
                    "run: {model: {hidden_size: 64, num_heads: 4}, data: {split: '98,1,1'}}\n")
    sweep = load_sweep(str(path), ["grid.lrs=[1e-3,1e-2]", "model.hidden_size=32"], str(tmp_path))
    cells = sweep.cells()
    assert [c.name for c in cells] == ["post_ln-layernorm-L2-d32-lr0.001-s1-w0",
                                       "post_ln-layernorm-L2-d32-lr0.01-s1-w0"]
    cfg = sweep.cell_config(cells[1])  # the command line wins over run:, the cell over both
    assert (cfg.model.hidden_size, cfg.model.norm, cfg.train.lr, cfg.data.split) == (
        32, "post_ln", 0.01, "98,1,1")
    assert cfg.logging.run_dir == str(tmp_path / "cells" / cells[1].name)
    with pytest.raises(ConfigError, match="unknown key grid.depth; known keys in grid"):
        load_sweep(str(path), ["grid.depth=[2]"])
    with pytest.raises(ConfigError, match=r"grid.schemes=\['postln'\] must be a non-empty list"):
        load_sweep(str(path), ["grid.schemes=[postln]"])
    with pytest.raises(ConfigError, match=r"grid.depths=\[0, 2\]: every depth must be >= 1"):
        load_sweep(str(path), ["grid.depths=[0,2]"])
    with pytest.raises(ConfigError, match="override 'model.num_heads=5': model.hidden_size=64 "
                                          "is not divisible by model.num_heads=5"):
        load_sweep(str(path), ["model.num_heads=5"])
    with pytest.raises(ConfigError, match="cell post_ln-layernorm-L2-d64-lr0.001-s1-w0: world "
                                          "size 1 is not divisible"):
        load_sweep(str(path), ["parallel.tensor_model_parallel_size=2"])


def test_todays_options_are_axes_recorded_per_cell_and_excluded_by_rule(tmp_path):
    """grid.qk_norm, z_loss, parametrization, num_query_groups and schedules cross the other
    axes (empty: the run's value), reach each cell's trainer config, are named where set, and
    grid.exclude drops the cells a rule matches."""
    path = tmp_path / "s.yaml"
    path.write_text("grid: {schemes: [magneto, pre_ln], depths: [2], lrs: [0.001], steps: 10,"
                    " qk_norm: [false, true], z_loss: [0.0, 1.0e-4], num_query_groups: [2],"
                    " schedules: [wsd], parametrization: [mup],"
                    " exclude: [{scheme: magneto, qk_norm: true}, {qk_norm: false, z_loss: 1.0e-4}]}\n"
                    "run: {model: {hidden_size: 32, num_heads: 4, mup_base_hidden_size: 16}}\n")
    cells = load_sweep(str(path), [], str(tmp_path)).cells()
    assert [c.name for c in cells] == [
        "magneto-layernorm-L2-d32-lr0.001-s1-w0-mup-g2-wsd",
        "pre_ln-layernorm-L2-d32-lr0.001-s1-w0-mup-g2-wsd",
        "pre_ln-layernorm-L2-d32-lr0.001-s1-w0-qk-mup-g2-wsd",
        "pre_ln-layernorm-L2-d32-lr0.001-s1-w0-qk-z0.0001-mup-g2-wsd"]
    sweep = load_sweep(str(path), [], str(tmp_path))
    cfg = sweep.cell_config(cells[-1])
    assert (cfg.model.qk_norm, cfg.train.z_loss, cfg.model.num_query_groups,
            cfg.model.parametrization, cfg.train.lr_decay_style, cfg.train.wsd_decay_iters) == (
        True, 1e-4, 2, "mup", "wsd", 2)  # the cooldown: grid.wsd_decay_fraction of 10 steps
    assert {k: cells[-1].key()[k] for k in ("qk_norm", "z_loss", "schedule")} == {
        "qk_norm": True, "z_loss": 1e-4, "schedule": "wsd"}
    assert variant({**cells[-1].key(), "hidden_size": 32}) == "pre_ln+qk_norm+z0.0001+mup+gqa2+wsd"
    # an empty axis is the run's own value, and cells named before the axes keep their names
    plain = load_sweep(str(path), ["grid.qk_norm=[]", "grid.z_loss=[]", "grid.num_query_groups=[]",
                                   "grid.schedules=[]", "grid.parametrization=[]",
                                   "grid.exclude=[]", "model.qk_norm=true",
                                   "model.mup_base_hidden_size=null"], str(tmp_path))
    assert [c.name for c in plain.cells()] == ["magneto-layernorm-L2-d32-lr0.001-s1-w0-qk",
                                               "pre_ln-layernorm-L2-d32-lr0.001-s1-w0-qk"]
    with pytest.raises(ConfigError, match=r"grid.exclude: \{'depthh': 2\} must be a mapping of "
                                          "cell keys"):
        load_sweep(str(path), ["grid.exclude=[{depthh: 2}]"])
    with pytest.raises(ConfigError, match="grid.exclude leaves no cell to run"):
        load_sweep(str(path), ["grid.exclude=[{depth: 2}]"])
    with pytest.raises(ConfigError, match="lr_decay_style='step' must be cosine, linear, constant or wsd"):
        load_sweep(str(path), ["grid.schedules=[step]"])


@pytest.fixture
def small_model():
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=3, hidden_size=32, num_heads=2, ffn_hidden_size=64,
                      vocab_size=50, max_seq_len=16, dropout=0.1, norm="pre_ln")
    tokens = torch.randint(0, 50, (2, 16))
    batch = {"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": torch.ones(2, 16)}
    return build_model(cfg), GPTTask(50), batch


def test_diagnostics_equal_a_hand_computation(small_model):
    model, task, batch = small_model
    reference = copy.deepcopy(model).eval()
    diagnostics = Diagnostics(model, task, batch)
    rng = torch.get_rng_state()
    row = diagnostics.measure(0)
    # training is untouched: no .grad written, the random stream not advanced, mode kept
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert torch.equal(rng, torch.get_rng_state())
    # the hand computation: backward on a copy, per-layer norms of .grad, layer outputs by hand
    task.loss(task.forward(reference, batch), batch).backward()
    layers = reference.decoder.layers
    expected = [math.sqrt(sum(float(p.grad.pow(2).sum()) for p in layer.parameters()))
                for layer in layers]
    assert row["grad_norm_per_layer"] == pytest.approx(expected, rel=1e-5)
    x = reference.embed(batch["tokens"])
    rms = []
    for layer in layers:
        x = layer(x)
        rms.append(float(x.detach().pow(2).mean().sqrt()))
    assert row["residual_rms_per_layer"] == pytest.approx(rms, rel=1e-5)
    logits = reference(batch["tokens"])
    assert row["max_abs_logit"] == pytest.approx(float(logits.detach().abs().max()), rel=1e-6)
    assert row["model_update"] == 0.0 and row["update_ratio_per_layer"] is None
    # move layer 2's weights only: its ratio is the relative change, the others' are 0
    before = [p.detach().clone() for p in layers[1].parameters()]
    with torch.no_grad():
        for p in model.decoder.layers[1].parameters():
            p.mul_(1.1)
    later = diagnostics.measure(5)
    change = math.sqrt(sum(float((0.1 * b).pow(2).sum()) for b in before))
    size = math.sqrt(sum(float(b.pow(2).sum()) for b in before))
    assert later["update_ratio_per_layer"] == pytest.approx([0.0, change / size, 0.0], abs=1e-6)
    moved = float((model.eval()(batch["tokens"]) - logits).detach().pow(2).mean().sqrt())
    assert later["model_update"] == pytest.approx(moved, rel=1e-5) and moved > 0


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "stability",
                                                               "*.yaml"))))
def test_shipped_sweeps_load_and_every_cell_validates(path):
    assert len(load_sweep(path, []).cells()) >= 24


def test_a_line_cut_short_by_a_kill_is_left_out(tmp_path):
    """A sweep or cell killed mid-append leaves half a line; the rerun must still read the rest."""
    path = tmp_path / "results.jsonl"
    path.write_text('{"cell": "a"}\n{"cell": "b"}\n{"cell": "c", "verd')
    assert [r["cell"] for r in read_rows(str(path))] == ["a", "b"]
    drop_partial_line(str(path))  # before the sweep appends again
    assert path.read_text() == '{"cell": "a"}\n{"cell": "b"}\n'
