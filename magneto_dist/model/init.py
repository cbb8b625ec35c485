"""Magneto and DeepNet initialization constants, and the weight init that uses them.

Formulas (Wang et al., "Foundation Transformers" and "DeepNet"), N encoder and M decoder layers,
natural log:

    architecture       Magneto gamma               DeepNet alpha          DeepNet beta
    encoder-only       sqrt(ln 2N)                 (2N)^(1/4)             (8N)^(-1/4)
    decoder-only       sqrt(ln 2M)                 (2M)^(1/4)             (8M)^(-1/4)
    enc-dec encoder    sqrt(ln(3M) ln(2N) / 3)     0.81 (N^4 M)^(1/16)    0.87 (N^4 M)^(-1/16)
    enc-dec decoder    sqrt(ln 3M)                 (3M)^(1/4)             (12M)^(-1/4)

The paper recipe is xavier_normal_(W, gain) with the gain on W_v, W_o, W_1, W_2 and gain 1 on W_q,
W_k. The "torchscale" style reproduces microsoft/torchscale instead: PyTorch's default Linear init
times the gain (so absolute scales differ from the paper); it exists for comparisons only.
"""
from __future__ import annotations

import math
from typing import Optional

from torch import nn

from .config import ModelConfig


def _check_depths(arch: str, encoder_layers: Optional[int], decoder_layers: Optional[int]):
    need = {"encoder": ("encoder_layers",), "decoder": ("decoder_layers",),
            "encoder_decoder": ("encoder_layers", "decoder_layers")}
    if arch not in need:
        raise ValueError(f"arch={arch!r} is not one of {', '.join(need)}")
    given = {"encoder_layers": encoder_layers, "decoder_layers": decoder_layers}
    for name in need[arch]:
        if not isinstance(given[name], int) or given[name] < 1:
            raise ValueError(f"{name}={given[name]!r}: arch={arch!r} needs a positive layer count")


def magneto_gamma(arch: str, encoder_layers: Optional[int] = None,
                  decoder_layers: Optional[int] = None) -> dict:
    """Sub-LN init gain per side: {"encoder": float | None, "decoder": float | None}."""
    _check_depths(arch, encoder_layers, decoder_layers)
    n, m = encoder_layers, decoder_layers
    if arch == "encoder":
        return {"encoder": math.sqrt(math.log(2 * n)), "decoder": None}
    if arch == "decoder":
        return {"encoder": None, "decoder": math.sqrt(math.log(2 * m))}
    return {"encoder": math.sqrt(math.log(3 * m) * math.log(2 * n) / 3),
            "decoder": math.sqrt(math.log(3 * m))}


def deepnet_alpha_beta(arch: str, encoder_layers: Optional[int] = None,
                       decoder_layers: Optional[int] = None) -> dict:
    """DeepNorm (residual alpha, init beta) per side: {"encoder": (a, b) | None, "decoder": ...}."""
    _check_depths(arch, encoder_layers, decoder_layers)
    n, m = encoder_layers, decoder_layers
    if arch == "encoder":
        return {"encoder": ((2 * n) ** 0.25, (8 * n) ** -0.25), "decoder": None}
    if arch == "decoder":
        return {"encoder": None, "decoder": ((2 * m) ** 0.25, (8 * m) ** -0.25)}
    both = (n ** 4 * m) ** (1 / 16)
    return {"encoder": (0.81 * both, 0.87 / both),
            "decoder": ((3 * m) ** 0.25, (12 * m) ** -0.25)}


def stack_gains(cfg: ModelConfig, side: str) -> dict:
    """Init gains and residual alpha for one stack ("encoder" or "decoder") of a model."""
    depths = dict(encoder_layers=cfg.encoder_layers or None,
                  decoder_layers=cfg.decoder_layers or None)
    gains = {"init_gain": 1.0, "cross_init_gain": 1.0, "residual_alpha": 1.0}
    if cfg.norm == "magneto":
        # Cross-attention gets no gamma scaling (it has no inner LN either).
        gains["init_gain"] = magneto_gamma(cfg.arch, **depths)[side]
    elif cfg.norm == "deepnorm":
        alpha, beta = deepnet_alpha_beta(cfg.arch, **depths)[side]
        gains.update(init_gain=beta, cross_init_gain=beta, residual_alpha=alpha)
    return gains


def _init_linear(linear: nn.Module, gain: float, style: str) -> None:
    if style == "paper":
        nn.init.xavier_normal_(linear.weight, gain=gain)
    else:  # torchscale: PyTorch's default Linear init, scaled
        nn.Linear.reset_parameters(linear)
        linear.weight.data.mul_(gain)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def _linear_gains(model: nn.Module) -> dict:
    """id(linear) -> xavier gain for every projection of every attention and FFN sublayer."""
    from .layers import Attention, FeedForward  # layers imports this module's siblings only

    gains = {}
    for module in model.modules():
        if isinstance(module, Attention):
            gains.update({id(module.q_proj): 1.0, id(module.k_proj): 1.0,
                          id(module.v_proj): module.init_gain, id(module.out_proj): module.init_gain})
        elif isinstance(module, FeedForward):
            for proj in (module.fc1, module.fc1_gate, module.fc2):
                if proj is not None:
                    gains[id(proj)] = module.init_gain
    return gains


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Initialize every parameter of a freshly built model (single process, full weights):
    each projection once with its gain, then the embedding tables (and an untied head)."""
    gains = _linear_gains(model)
    head = model.lm_head
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not head:
            _init_linear(module, gains.get(id(module), 1.0), cfg.init_style)
    if model.embed.position is not None:
        nn.init.normal_(model.embed.position.weight, std=cfg.embedding_init_std)
    nn.init.normal_(model.embed.word.weight, std=cfg.embedding_init_std)
    if not cfg.tie_embeddings:  # GPT-2 / Megatron output init
        nn.init.normal_(head.weight, std=cfg.embedding_init_std)
