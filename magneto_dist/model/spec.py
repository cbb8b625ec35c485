"""Layer specs: where each normalization scheme puts its norms, as slots rather than flags.

Following megatron-core's ModuleSpec idea, a layer is a fixed skeleton with slots; a scheme is a
row of this table saying which slots are filled. Every sublayer (attention or FFN) computes

    x <- post_norm(alpha * x + output_norm(f(pre_norm(x) * input_scale)))

with f containing the optional inner norm (Sub-LN: on the merged heads before W_o, on the FFN
hidden before W_2) and head scale (NormFormer). The QK-norm slot is the model's choice rather than
the scheme's (model.qk_norm): layer_spec fills it in every scheme's attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional


@dataclass(frozen=True)
class SublayerSlots:
    pre_norm: bool = False     # norm on the sublayer input (Pre-LN family)
    inner_norm: bool = False   # Sub-LN: on merged heads before W_o, on the FFN hidden before W_2
    output_norm: bool = False  # NormFormer: on the attention output, before the residual add
    post_norm: bool = False    # Post-LN family: after the residual add
    head_scale: bool = False   # NormFormer: a learned scale per attention head
    qk_norm: bool = False      # QK-norm: on each head's queries and keys, before RoPE


@dataclass(frozen=True)
class SchemeSlots:
    attention: SublayerSlots
    ffn: SublayerSlots
    final_norm: bool           # a norm after the last layer of the stack
    scaled_residual: bool      # DeepNorm: x <- LN(alpha * x + f(x))
    depth_scaled_input: bool   # LayerNorm Scaling: pre-norm output times 1/sqrt(layer number)


_PRE = SublayerSlots(pre_norm=True)
_POST = SublayerSlots(post_norm=True)
_SUB_LN = SublayerSlots(pre_norm=True, inner_norm=True)

SCHEMES = {
    "post_ln": SchemeSlots(_POST, _POST, final_norm=False, scaled_residual=False,
                           depth_scaled_input=False),
    "pre_ln": SchemeSlots(_PRE, _PRE, final_norm=True, scaled_residual=False,
                          depth_scaled_input=False),
    "deepnorm": SchemeSlots(_POST, _POST, final_norm=False, scaled_residual=True,
                            depth_scaled_input=False),
    "magneto": SchemeSlots(_SUB_LN, _SUB_LN, final_norm=True, scaled_residual=False,
                           depth_scaled_input=False),
    "normformer": SchemeSlots(SublayerSlots(pre_norm=True, output_norm=True, head_scale=True),
                              _SUB_LN, final_norm=True, scaled_residual=False,
                              depth_scaled_input=False),
    "lns": SchemeSlots(_PRE, _PRE, final_norm=True, scaled_residual=False,
                       depth_scaled_input=True),
}


def cross_attention_slots(scheme: SchemeSlots) -> SublayerSlots:
    """Cross-attention keeps the scheme's residual norms but gets no inner norm or head scale."""
    return replace(scheme.attention, inner_norm=False, output_norm=False, head_scale=False)


@dataclass(frozen=True)
class LayerSpec:
    """Everything one layer of one stack needs to build itself."""
    attention: SublayerSlots
    cross_attention: Optional[SublayerSlots]  # None outside an encoder-decoder's decoder
    ffn: SublayerSlots
    residual_alpha: float      # 1.0 except DeepNorm
    input_scale: float         # 1.0 except LayerNorm Scaling (1/sqrt(layer_number))
    init_gain: float           # xavier gain of W_v, W_o, W_1, W_2 (W_q, W_k always get 1)
    cross_init_gain: float     # the same for the cross-attention's W_v, W_o
    causal: bool               # causal self-attention (decoders)
    attention_scale: Optional[float] = None  # softmax scale of q.k (None: 1/sqrt(head_dim));
                                             # muP's is mup.attention_scale


def layer_spec(scheme_name: str, layer_number: int, gains: dict, causal: bool,
               cross: bool, qk_norm: bool = False,
               attention_scale: Optional[float] = None) -> LayerSpec:
    """The spec of layer `layer_number` (1-based) of a stack.

    gains: {"init_gain", "cross_init_gain", "residual_alpha"} for this stack (see init.py).
    """
    scheme = SCHEMES[scheme_name]
    return LayerSpec(
        attention=replace(scheme.attention, qk_norm=qk_norm),
        cross_attention=replace(cross_attention_slots(scheme), qk_norm=qk_norm) if cross else None,
        ffn=scheme.ffn,
        residual_alpha=gains["residual_alpha"] if scheme.scaled_residual else 1.0,
        input_scale=1.0 / math.sqrt(layer_number) if scheme.depth_scaled_input else 1.0,
        init_gain=gains["init_gain"],
        cross_init_gain=gains["cross_init_gain"],
        causal=causal,
        attention_scale=attention_scale,
    )
