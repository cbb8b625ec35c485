"""muP, the maximal-update parametrization (Yang et al. 2022, "Tensor Programs V", Table 3, the
Adam column), and how it composes with each norm scheme's own initialization.

With m = hidden_size / mup_base_hidden_size, TP5 Table 3 asks, by the kind of parameter:

    kind (TP5)                      init variance     Adam LR     here
    input weights and all biases    1 / fan_in        1           embeddings: std 0.02 at any
      (and norm gains: vectors)                                   width (fan_in is the one-hot
                                                                  vocabulary's, width-free); LR x1
    hidden weights                  1 / fan_in        1 / fan_in  W_q, W_k, W_v, W_o, W_1, W_2,
                                                                  the MLM dense: xavier; LR x 1/m
    output weights                  1 / fan_in^2      1 / fan_in  the head: std 0.02 at any
                                                                  width, logits x 1/m; LR x1

plus attention logits q.k / d_head instead of q.k / sqrt(d_head). The output row is written in
the equivalent multiplier form TP5 gives beside Table 3 (the `mup` package's MuReadout): a
fixed-std head whose logits are multiplied by 1/m scales like the 1/fan_in^2 init with a
1/fan_in LR, and it is the form that works with a tied embedding (one matrix reads in with x1
and out with x 1/m). At the base width (m = 1, mup_base_head_dim = head_dim) every factor is 1:
muP is the standard model there, so hyperparameters tuned on a small standard model carry over.

How the norm schemes' constants compose with it. xavier_normal's variance 2 / (fan_in + fan_out)
is muP's 1 / fan_in up to a width-free constant (the width rule keeps fan_out / fan_in fixed;
torchscale's U(+-1/sqrt(fan_in)) is 1 / fan_in itself), so the init is kept: it is already
muP's width-scaled one. Magneto's gamma and DeepNet's beta multiply that std and DeepNet's alpha
the residual; all three depend on depth only, so they are the width-free constant multipliers
TP5 leaves free (Table 3's caption: tunable multipliers in front of fan_in) and compose
multiplicatively: muP fixes how things scale with width (the exponents of fan_in), DeepNet and
Magneto a depth factor. DeepNet's bound on the model update (an O(lr) Adam step per weight
entry, summed over 2N sublayers) holds at the base width; muP's 1/m on the hidden matrices' LR
keeps each sublayer's update at its base-width size as the width grows, so the depth bound
carries over. LayerNorm Scaling's 1/sqrt(layer) is a depth factor too. Norm gains (the QK-norm's
included), biases and NormFormer's head scales are vectors: untouched. Grouped-query attention
with a fixed num_query_groups keeps W_k, W_v's fan_out fixed as the width grows; they are
treated as hidden matrices, as muP implementations do.
"""
from __future__ import annotations

import math
import re
from typing import Optional

from .config import ModelConfig

# Parameter groups of the optimizer, by name, in their fixed order (every rank and layout has
# the same list, empty or not: DeepSpeed's universal loader pairs saved and current groups by
# position). Standard runs have the first two only, as before muP existed.
MATRICES, VECTORS, HIDDEN_MATRICES = "matrices", "vectors", "hidden_matrices"
GROUP_ORDER = (MATRICES, VECTORS, HIDDEN_MATRICES)
# TP5's hidden weights: both dimensions grow with width. Names as in the model, a TP shard or a
# pipeline stage ("3.layer.self_attn.q_proj.weight").
_HIDDEN = re.compile(r"(.*\.)?(q_proj|k_proj|v_proj|out_proj|fc1|fc1_gate|fc2|mlm_dense)\.weight$")


def is_mup(cfg: ModelConfig) -> bool:
    return cfg.parametrization == "mup"


def width_multiplier(cfg: ModelConfig) -> float:
    """m = hidden_size / mup_base_hidden_size (1 under the standard parametrization)."""
    return cfg.hidden_size / cfg.mup_base_hidden_size if is_mup(cfg) else 1.0


def output_multiplier(cfg: ModelConfig) -> float:
    """The factor on the head's input (so on the logits): 1/m."""
    return 1.0 / width_multiplier(cfg)


def attention_scale(cfg: ModelConfig) -> Optional[float]:
    """The softmax scale of q.k: None (SDPA's 1/sqrt(d_head)) under the standard
    parametrization; muP's 1/d_head times sqrt(base head dim), the constant that makes it the
    standard 1/sqrt(d_head) at the base width (the `mup` package's 8/d for a base d_head of
    64). With mup_base_head_dim unset the head dim is the base's and the scale is the standard
    one: widths that grow by adding heads need no change (TP5 section 4)."""
    if not is_mup(cfg):
        return None
    base = cfg.mup_base_head_dim or cfg.head_dim
    return math.sqrt(base) / cfg.head_dim


def param_group(name: str, ndim: int, cfg: ModelConfig) -> str:
    """The optimizer group of a parameter: vectors (biases, norm gains, head scales: no weight
    decay), hidden matrices (muP only: their LR x 1/m) or the other matrices."""
    if ndim < 2:
        return VECTORS
    return HIDDEN_MATRICES if is_mup(cfg) and _HIDDEN.match(name) else MATRICES


def group_lr_multipliers(cfg: ModelConfig) -> dict:
    """Group name -> its LR as a multiple of train.lr, for the groups this model's optimizer
    has, in order."""
    groups = {MATRICES: 1.0, VECTORS: 1.0}
    if is_mup(cfg):
        groups[HIDDEN_MATRICES] = 1.0 / width_multiplier(cfg)
    return groups
