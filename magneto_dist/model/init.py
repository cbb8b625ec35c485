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

import hashlib
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
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


# How one full parameter starts. Each is made from its own generator, seeded by (seed, the
# parameter's name): a rank that holds only a shard of the model makes exactly the full tensors
# the single-process model has, one parameter at a time, and slices them (parallel/materialize.py).
@dataclass(frozen=True)
class ParamInit:
    kind: str          # xavier | torchscale | normal | ones | zeros
    scale: float = 1.0  # xavier / torchscale gain, normal std

    def full(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        """The full fp32 tensor on the CPU (CPU generators give the same numbers everywhere)."""
        if self.kind == "ones":
            return torch.ones(shape)
        if self.kind == "zeros":
            return torch.zeros(shape)
        out = torch.empty(shape)
        if self.kind == "normal":
            return out.normal_(0.0, self.scale, generator=generator)
        fan_out, fan_in = shape
        if self.kind == "xavier":  # the paper recipe: xavier_normal_(W, gain)
            return out.normal_(0.0, self.scale * math.sqrt(2.0 / (fan_in + fan_out)),
                               generator=generator)
        # torchscale: nn.Linear's default kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in),
        # 1/sqrt(fan_in)), times the gain
        bound = self.scale / math.sqrt(fan_in)
        return out.uniform_(-bound, bound, generator=generator)


def _linear_gains(model: nn.Module) -> dict:
    """id(linear) -> xavier gain for every projection of every attention and FFN sublayer."""
    from .layers import Attention, FeedForward  # layers imports this module's siblings only

    gains = {}
    for module in model.modules():
        if isinstance(module, Attention):
            gains.update({id(module.q_proj): 1.0, id(module.k_proj): 1.0,
                          id(module.v_proj): module.init_gain,
                          id(module.out_proj): module.init_gain})
        elif isinstance(module, FeedForward):
            for proj in (module.fc1, module.fc1_gate, module.fc2):
                if proj is not None:
                    gains[id(proj)] = module.init_gain
    return gains


def _module_inits(module: nn.Module, gains: dict, cfg: ModelConfig, head: nn.Module) -> dict:
    """Local parameter name -> ParamInit for one module's own parameters."""
    from .norms import is_norm

    if isinstance(module, nn.Linear) and module is not head:
        kind = "xavier" if cfg.init_style == "paper" else "torchscale"
        return {"weight": ParamInit(kind, gains.get(id(module), 1.0)),
                "bias": ParamInit("zeros")}
    if isinstance(module, nn.Embedding) or module is head:  # GPT-2 / Megatron embedding init
        return {"weight": ParamInit("normal", cfg.embedding_init_std)}
    if is_norm(module):
        return {"weight": ParamInit("ones"), "bias": ParamInit("zeros")}
    return {"head_scale": ParamInit("ones")}  # NormFormer's per-head scales


def init_plan(model: nn.Module, cfg: ModelConfig) -> Dict[str, Tuple[str, ParamInit]]:
    """Every parameter name (tied aliases too) -> (the owner's name, which keys the generator;
    its init), from the full model or its meta-device skeleton. A parameter no rule covers is
    an error, so a new parameter cannot silently start from uninitialized memory."""
    gains, head = _linear_gains(model), model.lm_head
    owners, plan = {}, {}
    for module_name, module in model.named_modules():
        rules = _module_inits(module, gains, cfg, head)
        for local, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{local}" if module_name else local
            if local not in rules:
                raise KeyError(f"parameter {name!r} has no init rule (magneto_dist/model/init.py)")
            owner = owners.setdefault(id(param), name)
            plan[name] = (owner, rules[local]) if owner == name else plan[owner]
    return plan


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class InitWeights:
    """name -> the full initial fp32 tensor of that parameter, made on demand from (seed, name):
    the same numbers for every layout, whichever rank asks and in whatever order."""

    def __init__(self, model: nn.Module, cfg: ModelConfig, seed: int):
        self.plan, self.seed = init_plan(model, cfg), seed
        self.shapes = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}

    def __call__(self, name: str) -> torch.Tensor:
        owner, init = self.plan[name]
        return init.full(self.shapes[owner], _generator(self.seed, owner))


def init_weights(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Initialize every parameter of a full model in place, one parameter at a time."""
    weights = InitWeights(model, cfg, seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(weights(name))
