"""muP's parameter groups and factors, and the z-loss, on one process (their multi-rank
equality is in tests/dist/test_layouts.py, resume across layouts in tests/dist/test_reshard.py)."""
import math

import pytest
import torch

from magneto_dist.config import load_config
from magneto_dist.model import build_model, mup
from magneto_dist.training.engine import group_settings, optimizer_param_groups
from magneto_dist.training.tasks import GPTTask

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4",
        "model.ffn_hidden_size=64", "model.vocab_size=50", "model.max_seq_len=16",
        "train.lr=0.01", "train.weight_decay=0.1"]
MUP = ["model.parametrization=mup", "model.mup_base_hidden_size=8", "model.mup_base_head_dim=2"]


def test_mup_groups_scale_the_hidden_matrices_lr_only():
    """Width 32 over a base of 8: the hidden matrices' LR is lr / 4; embeddings and the untied
    head keep lr and decay; vectors keep lr without decay; every parameter in one group."""
    cfg = load_config(None, TINY + MUP + ["model.tie_embeddings=false"])
    model = build_model(cfg.model, seed=0)
    groups = optimizer_param_groups(model, cfg)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("matrices", 0.01, 0.1), ("vectors", 0.01, 0.0), ("hidden_matrices", 0.0025, 0.1)]
    names = {id(p): n for n, p in model.named_parameters()}
    members = {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}
    assert members["matrices"] == {"embed.word.weight", "embed.position.weight", "lm_head.weight"}
    assert "decoder.layers.1.self_attn.k_proj.weight" in members["hidden_matrices"]
    assert "decoder.layers.0.ffn.fc2.weight" in members["hidden_matrices"]
    assert "decoder.layers.0.ffn.fc2.bias" in members["vectors"]
    assert sum(map(len, members.values())) == len(names)
    standard = load_config(None, TINY)
    assert [g["name"] for g in group_settings(standard)] == ["matrices", "vectors"]


def test_mup_is_the_standard_model_at_the_base_width():
    """m = 1 and the base head dim equal to the model's: every muP factor is 1, the logits are
    the standard model's bit for bit, and so are the groups' LRs."""
    base = ["model.parametrization=mup", "model.mup_base_hidden_size=32"]
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    standard = build_model(load_config(None, TINY).model, seed=3)(tokens)
    cfg = load_config(None, TINY + base)
    assert torch.equal(build_model(cfg.model, seed=3)(tokens), standard)
    assert {g["lr"] for g in group_settings(cfg)} == {0.01}


def test_mup_factors_at_four_times_the_base_width():
    cfg = load_config(None, TINY + MUP).model
    assert mup.width_multiplier(cfg) == 4.0 and mup.output_multiplier(cfg) == 0.25
    assert mup.attention_scale(cfg) == pytest.approx(math.sqrt(2) / 8)  # 1/d_head, x sqrt(2)
    model = build_model(cfg, seed=0)
    assert model.readout_multiplier == 0.25
    assert model.decoder.layers[0].self_attn.softmax_scale == pytest.approx(math.sqrt(2) / 8)
    # widths that grow by adding heads (no base head dim): the standard 1/sqrt(d_head)
    by_heads = load_config(None, TINY + MUP[:2]).model
    assert mup.attention_scale(by_heads) == pytest.approx(1 / math.sqrt(8))


def test_z_loss_adds_its_gradient_and_leaves_the_loss_value_the_cross_entropy():
    logits = torch.randn(2, 5, 50, requires_grad=True)  # fp32: the losses are computed in fp32
    labels = torch.randint(0, 40, (2, 5))
    batch = {"labels": labels, "loss_mask": torch.ones(2, 5)}
    task = GPTTask(40, z_loss=0.3)
    loss = task.loss(logits, batch)
    assert torch.equal(loss.detach(), GPTTask(40).loss(logits, batch).detach())
    (grad,) = torch.autograd.grad(loss, logits)
    lse = logits[..., :40].logsumexp(-1)
    reference = (torch.nn.functional.cross_entropy(logits[..., :40].flatten(0, 1),
                                                   labels.flatten()) + 0.3 * lse.square().mean())
    (expected,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-8)
    assert (grad - torch.autograd.grad(GPTTask(40).loss(logits, batch), logits)[0]).abs().max() \
        > 1e-3  # the z-loss changed the gradient
