"""Norm providers: LayerNorm and RMSNorm that compute in fp32 whatever the activation dtype.

Statistics of a bf16 activation lose too many bits, so both norms upcast, normalize and cast back
(as Megatron's fused norms do internally). The tensor-parallel Sub-LN in magneto_dist.parallel
subclasses these and swaps in all-reduced statistics.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.affine()
        y = F.layer_norm(x.float(), self.normalized_shape, weight.float(), bias.float(), self.eps)
        return y.type_as(x)

    def affine(self):
        """(gain, bias) as the forward uses them; a TP variant routes their gradient."""
        return self.weight, self.bias


class RMSNorm(nn.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, _ = self.affine()
        y = F.rms_norm(x.float(), self.normalized_shape, weight.float(), self.eps)
        return y.type_as(x)

    def affine(self):
        return self.weight, None


NORM_CLASSES = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}


def make_norm(norm_type: str, width: int, eps: float) -> nn.Module:
    """The norm provider every slot of a layer spec is filled from."""
    return NORM_CLASSES[norm_type](width, eps=eps)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, tuple(NORM_CLASSES.values()))
