"""The Magneto / DeepNet constants and the measured weight scales they produce."""
import math

import pytest
import torch

from magneto_dist.model import ModelConfig, build_model, deepnet_alpha_beta, magneto_gamma

ln = math.log


@pytest.mark.parametrize("n", [1, 6, 12, 24, 100])
def test_single_stack_formulas(n):
    assert magneto_gamma("decoder", decoder_layers=n) == {"encoder": None,
                                                          "decoder": pytest.approx(math.sqrt(ln(2 * n)))}
    assert magneto_gamma("encoder", encoder_layers=n)["encoder"] == pytest.approx(math.sqrt(ln(2 * n)))
    for arch, key, kw in (("decoder", "decoder", "decoder_layers"),
                          ("encoder", "encoder", "encoder_layers")):
        alpha, beta = deepnet_alpha_beta(arch, **{kw: n})[key]
        assert alpha == pytest.approx((2 * n) ** 0.25)
        assert beta == pytest.approx((8 * n) ** -0.25)


@pytest.mark.parametrize("n,m", [(6, 6), (12, 12), (18, 6), (100, 100)])
def test_encoder_decoder_formulas(n, m):
    gamma = magneto_gamma("encoder_decoder", encoder_layers=n, decoder_layers=m)
    assert gamma["encoder"] == pytest.approx(math.sqrt(ln(3 * m) * ln(2 * n) / 3))
    assert gamma["decoder"] == pytest.approx(math.sqrt(ln(3 * m)))
    ab = deepnet_alpha_beta("encoder_decoder", encoder_layers=n, decoder_layers=m)
    assert ab["encoder"][0] == pytest.approx(0.81 * (n ** 4 * m) ** (1 / 16))
    assert ab["encoder"][1] == pytest.approx(0.87 * (n ** 4 * m) ** (-1 / 16))
    assert ab["decoder"][0] == pytest.approx((3 * m) ** 0.25)
    assert ab["decoder"][1] == pytest.approx((12 * m) ** -0.25)


def test_reference_values_from_design():
    assert magneto_gamma("decoder", decoder_layers=12)["decoder"] == pytest.approx(1.7827, abs=1e-4)
    assert magneto_gamma("decoder", decoder_layers=24)["decoder"] == pytest.approx(1.9675, abs=1e-4)
    alpha, beta = deepnet_alpha_beta("decoder", decoder_layers=12)["decoder"]
    assert (alpha, beta) == (pytest.approx(2.2134, abs=1e-4), pytest.approx(0.3195, abs=1e-4))
    g = magneto_gamma("encoder_decoder", encoder_layers=12, decoder_layers=12)
    assert g == {"encoder": pytest.approx(1.9484, abs=1e-4), "decoder": pytest.approx(1.8930, abs=1e-4)}


def test_missing_depth_is_an_error():
    with pytest.raises(ValueError, match="decoder_layers"):
        magneto_gamma("encoder_decoder", encoder_layers=12)
    with pytest.raises(ValueError, match="arch='gpt'"):
        deepnet_alpha_beta("gpt", decoder_layers=12)


def _std(linear):
    return linear.weight.detach().std().item()


@pytest.mark.parametrize("norm,expected_gain", [
    ("magneto", math.sqrt(ln(2 * 6))), ("deepnorm", (8 * 6) ** -0.25), ("pre_ln", 1.0)])
def test_measured_init_std_follows_paper_recipe(norm, expected_gain):
    torch.manual_seed(0)
    d, f = 256, 1024
    cfg = ModelConfig(norm=norm, num_layers=6, hidden_size=d, num_heads=4, ffn_hidden_size=f,
                      vocab_size=64, max_seq_len=8)
    layer = build_model(cfg).decoder.layers[3]
    xavier = lambda fan_in, fan_out, g: g * math.sqrt(2.0 / (fan_in + fan_out))  # noqa: E731
    att, ffn = layer.self_attn, layer.ffn
    # 65k-262k samples each: the relative sampling error of a std is ~0.3%; 2% is generous.
    for proj in (att.q_proj, att.k_proj):
        assert _std(proj) == pytest.approx(xavier(d, d, 1.0), rel=0.02)
    for proj in (att.v_proj, att.out_proj):
        assert _std(proj) == pytest.approx(xavier(d, d, expected_gain), rel=0.02)
    assert _std(ffn.fc1) == pytest.approx(xavier(d, f, expected_gain), rel=0.02)
    assert _std(ffn.fc2) == pytest.approx(xavier(f, d, expected_gain), rel=0.02)
    assert att.q_proj.bias.abs().max().item() == 0.0


def test_torchscale_style_scales_default_linear_init():
    torch.manual_seed(0)
    d = 256
    cfg = ModelConfig(norm="magneto", init_style="torchscale", num_layers=6, hidden_size=d,
                      num_heads=4, vocab_size=64, max_seq_len=8)
    att = build_model(cfg).decoder.layers[0].self_attn
    default_std = 1.0 / math.sqrt(3 * d)  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(d), 1/sqrt(d))
    assert _std(att.q_proj) == pytest.approx(default_std, rel=0.02)
    assert _std(att.v_proj) == pytest.approx(default_std * math.sqrt(ln(12)), rel=0.02)


def test_encoder_decoder_cross_attention_has_no_gamma():
    torch.manual_seed(0)
    d = 256
    cfg = ModelConfig(arch="encoder_decoder", norm="magneto", num_layers=6, num_decoder_layers=6,
                      hidden_size=d, num_heads=4, vocab_size=64, max_seq_len=8)
    model = build_model(cfg)
    gammas = magneto_gamma("encoder_decoder", encoder_layers=6, decoder_layers=6)
    unit = math.sqrt(2.0 / (2 * d))
    assert _std(model.encoder.layers[0].self_attn.v_proj) == pytest.approx(unit * gammas["encoder"], rel=0.02)
    assert _std(model.decoder.layers[0].self_attn.v_proj) == pytest.approx(unit * gammas["decoder"], rel=0.02)
    assert _std(model.decoder.layers[0].cross_attn.v_proj) == pytest.approx(unit, rel=0.02)
