"""Training FLOPs per token, for throughput and MFU.

The "6N + attention" formula (Kaplan et al.; PaLM appendix B): a forward pass costs 2 FLOPs per
weight per token for every matmul, plus 4 * s * d per layer for the attention scores and the
weighted sum (counted over the full s x s square, as Megatron and PaLM do, even when causal);
backward costs twice the forward. N counts the matmul weights: projections, FFN and the output
projection (d * V), but not the embedding lookup or norms, which do no matmul. Grouped-query
attention narrows W_k and W_v to num_query_groups heads; the scores and the weighted sum still
run over every query head (the key/value heads are repeated, not fewer).
"""
from __future__ import annotations

from typing import Optional

from .config import ModelConfig


def _layer_matmul_weights(cfg: ModelConfig, cross: bool) -> int:
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    attention = 2 * d * d + 2 * d * cfg.kv_size  # W_q, W_o; W_k, W_v (GQA: narrower)
    ffn = (3 if cfg.activation == "swiglu" else 2) * d * f
    return attention * (2 if cross else 1) + ffn


def flops_per_token(cfg: ModelConfig, seq_len: Optional[int] = None) -> float:
    """Training (forward + backward) FLOPs per token at sequence length seq_len (default max).

    For encoder_decoder, a "token" is one target token with one source token beside it
    (source length = target length = seq_len).
    """
    s = seq_len or cfg.max_seq_len
    d = cfg.hidden_size
    weights = cfg.hidden_size * cfg.vocab_size  # the output projection
    attention_layers = 0
    for depth, cross in ((cfg.encoder_layers, False), (cfg.decoder_layers, cfg.arch ==
                                                       "encoder_decoder")):
        weights += depth * _layer_matmul_weights(cfg, cross)
        attention_layers += depth * (2 if cross else 1)
    if cfg.arch == "encoder":
        weights += d * d  # the MLM transform
    forward = 2 * weights + 4 * s * d * attention_layers
    return 3.0 * forward
