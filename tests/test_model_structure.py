"""Where each scheme puts its norms, residual scaling, config validation, FLOP count."""
import math
import re

import pytest
import torch

from magneto_dist.model import ModelConfig, build_model, flops_per_token
from magneto_dist.model.norms import LayerNorm, RMSNorm, is_norm

L = 3


def _decoder(norm, **kw):
    cfg = dict(norm=norm, num_layers=L, hidden_size=32, num_heads=4, vocab_size=50, max_seq_len=16)
    cfg.update(kw)
    return build_model(ModelConfig(**cfg))


def _norms(module):
    return [name for name, m in module.named_modules() if is_norm(m)]


@pytest.mark.parametrize("norm,count,final", [
    ("post_ln", 2 * L, False), ("pre_ln", 2 * L + 1, True), ("deepnorm", 2 * L, False),
    ("magneto", 4 * L + 1, True), ("normformer", 4 * L + 1, True), ("lns", 2 * L + 1, True)])
def test_norm_count_and_final_norm(norm, count, final):
    model = _decoder(norm)
    assert len(_norms(model)) == count
    assert (model.decoder.final_norm is not None) == final


def test_slot_placements():
    layer = _decoder("magneto").decoder.layers[0]
    assert set(_norms(layer)) == {"self_attn.pre_norm", "self_attn.inner_norm",
                                  "ffn.pre_norm", "ffn.inner_norm"}
    assert layer.self_attn.inner_norm.normalized_shape == (32,)
    assert layer.ffn.inner_norm.normalized_shape == (128,)  # FFN hidden width
    layer = _decoder("normformer").decoder.layers[0]
    assert set(_norms(layer)) == {"self_attn.pre_norm", "self_attn.output_norm",
                                  "ffn.pre_norm", "ffn.inner_norm"}
    assert layer.self_attn.head_scale.shape == (4,)
    assert set(_norms(_decoder("post_ln").decoder.layers[0])) == {"self_attn.post_norm",
                                                                  "ffn.post_norm"}
    assert _decoder("magneto").decoder.layers[0].self_attn.head_scale is None


def test_deepnorm_residual_uses_alpha():
    model = _decoder("deepnorm")
    alpha = (2 * L) ** 0.25
    sub = model.decoder.layers[1].ffn
    assert sub.residual_alpha == pytest.approx(alpha)
    # post_norm(alpha * x + f(x)): with f's output projection zeroed, the result is LN(alpha * x).
    torch.nn.init.zeros_(sub.fc2.weight)
    torch.nn.init.zeros_(sub.fc2.bias)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(sub(x), sub.post_norm(alpha * x))
    assert _decoder("post_ln").decoder.layers[1].ffn.residual_alpha == 1.0


def test_lns_scales_pre_norm_output_by_inverse_sqrt_depth():
    model = _decoder("lns")
    scales = [layer.self_attn.input_scale for layer in model.decoder.layers]
    assert scales == pytest.approx([1 / math.sqrt(i) for i in range(1, L + 1)])


def test_rmsnorm_everywhere():
    model = _decoder("magneto", norm_type="rmsnorm")
    norms = [m for m in model.modules() if is_norm(m)]
    assert norms and all(isinstance(m, RMSNorm) for m in norms)
    assert not any(isinstance(m, LayerNorm) for m in norms)


def test_encoder_decoder_cross_attention_slots():
    cfg = ModelConfig(arch="encoder_decoder", norm="magneto", num_layers=2, num_decoder_layers=3,
                      hidden_size=32, num_heads=4, vocab_size=50, max_seq_len=16)
    model = build_model(cfg)
    assert len(model.encoder.layers) == 2 and len(model.decoder.layers) == 3
    cross = model.decoder.layers[0].cross_attn
    assert cross.pre_norm is not None and cross.inner_norm is None
    assert all(layer.cross_attn is None for layer in model.encoder.layers)


def test_tied_and_untied_embeddings():
    tied = _decoder("magneto")
    assert tied.lm_head.weight is tied.embed.word.weight
    untied = _decoder("magneto", tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed.word.weight


@pytest.mark.parametrize("kw,message", [
    (dict(hidden_size=30, num_heads=4), "hidden_size=30 is not divisible by model.num_heads=4"),
    (dict(norm="batchnorm"), "model.norm='batchnorm' is not one of"),
    (dict(norm_type="groupnorm"), "model.norm_type='groupnorm'"),
    (dict(position="alibi"), "model.position='alibi'"),
    (dict(num_layers=0), "model.num_layers=0 must be a positive integer"),
    (dict(num_decoder_layers=4), "num_decoder_layers is only used by arch='encoder_decoder'"),
    (dict(dropout=1.5), "model.dropout=1.5"),
    (dict(position="rope", hidden_size=12, num_heads=4), "even head dim"),
    (dict(num_query_groups=3), "model.num_query_groups=3 does not divide model.num_heads=4"),
    (dict(num_query_groups=0), "model.num_query_groups=0 must be a positive integer"),
    (dict(parametrization="ntk"), "model.parametrization='ntk' is not one of standard, mup"),
    (dict(parametrization="mup"), "model.parametrization='mup' needs model.mup_base_hidden_size"),
    (dict(mup_base_hidden_size=64), "model.mup_base_hidden_size is only used by "
                                    "model.parametrization='mup'"),
    (dict(parametrization="mup", mup_base_hidden_size=16, mup_base_head_dim=0),
     "model.mup_base_head_dim=0 must be a positive integer"),
])
def test_config_errors_name_the_field(kw, message):
    cfg = dict(hidden_size=32, num_heads=4)
    cfg.update(kw)
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig(**cfg)


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="max_seq_len is 16"):
        _decoder("magneto")(torch.zeros(1, 17, dtype=torch.long))


def test_flops_formula():
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=100, max_seq_len=32)
    n = 2 * (4 * 64 * 64 + 2 * 64 * 256) + 64 * 100
    assert flops_per_token(cfg, 32) == 6 * n + 3 * 4 * 32 * 64 * 2
    matmul_weights = sum(m.weight.numel() for m in build_model(cfg).modules()
                         if isinstance(m, torch.nn.Linear))
    assert matmul_weights == n  # the formula's N is exactly the model's matmul weights
    swiglu = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=100,
                         max_seq_len=32, activation="swiglu")
    assert flops_per_token(swiglu, 32) - flops_per_token(cfg, 32) == 6 * 2 * 64 * 256


def test_flops_count_grouped_query_attention():
    """GQA's W_k and W_v are num_query_groups heads wide; the attention term is unchanged
    (every query head still attends); the formula's N stays the model's matmul weights."""
    common = dict(num_layers=2, hidden_size=64, num_heads=4, vocab_size=100, max_seq_len=32)
    mha, gqa = ModelConfig(**common), ModelConfig(**common, num_query_groups=1)
    assert flops_per_token(mha, 32) - flops_per_token(gqa, 32) == 6 * 2 * 2 * 64 * (64 - 16)
    matmul_weights = sum(m.weight.numel() for m in build_model(gqa).modules()
                         if isinstance(m, torch.nn.Linear))
    attention = 3 * 4 * 32 * 64 * 2
    assert flops_per_token(gqa, 32) == 6 * matmul_weights + attention
