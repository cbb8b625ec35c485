"""The transformer layer skeleton: embeddings, rotary positions, attention, FFN, residual slots.

No parallelism lives here. Tensor parallelism (magneto_dist.parallel) swaps the projections for
megatron-core's column/row-parallel layers and the inner norms for TP-aware ones; every forward
below therefore infers the local head count from tensor shapes instead of the config.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Documents, DotProductAttention
from .config import ModelConfig
from .norms import make_norm
from .spec import LayerSpec, SublayerSlots


class Embeddings(nn.Module):
    """Token embedding plus (optionally) learned absolute positions, then dropout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = (nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
                         if cfg.position == "learned" else None)
        self.dropout = nn.Dropout(cfg.dropout)
        # The output as the layers hold it: whole here; sequence parallelism swaps in a split
        # along the sequence (magneto_dist/parallel/sequence_parallel.py).
        self.to_layers = nn.Identity()

    def forward(self, tokens: torch.Tensor,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """position_ids [b, s]: each token's position (restarting per packed document, or a
        chunk's global offsets under context parallelism); None: 0 .. s-1."""
        x = self.word(tokens)  # [b, s, d]
        if self.position is not None:
            x = x + self.position(positions_of(tokens, position_ids))
        return self.dropout(self.to_layers(x))


def positions_of(tokens: torch.Tensor, position_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """The given position ids, or 0 .. s-1 for every sequence."""
    if position_ids is not None:
        return position_ids
    return torch.arange(tokens.shape[1], device=tokens.device)


class Rotary(nn.Module):
    """RoPE tables (cos, sin) for every position, in the "rotate half" layout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Made on the CPU even inside a meta-device build (model_skeleton): tables are derived,
        # not initialized, so materializing a shard has no buffers to recompute.
        cpu = torch.device("cpu")
        inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2, device=cpu).float()
                                           / cfg.head_dim)
        angles = torch.outer(torch.arange(cfg.max_seq_len, device=cpu).float(), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)                            # [S, hd]
        # Not persistent: derived from the config, so checkpoints stay layout- and version-free.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, seq_len: int, position_ids: Optional[torch.Tensor] = None):
        """(cos, sin): [s, hd] for positions 0 .. s-1, or [b, 1, s, hd] at position_ids
        [b, s] (broadcast over heads)."""
        if position_ids is None:
            return self.cos[:seq_len], self.sin[:seq_len]
        return self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)


def apply_rotary(x: torch.Tensor, rope) -> torch.Tensor:
    """x: [b, h, s, hd]; rotates pairs (i, i + hd/2) by the position angle."""
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


class ResidualSublayer(nn.Module):
    """x -> post_norm(alpha * x + output_norm(dropout(f(pre_norm(x) * input_scale))))."""

    def __init__(self, cfg: ModelConfig, slots: SublayerSlots, spec: LayerSpec, init_gain: float):
        super().__init__()
        width = cfg.hidden_size
        norm = lambda: make_norm(cfg.norm_type, width, cfg.norm_eps)  # noqa: E731
        self.pre_norm = norm() if slots.pre_norm else None
        self.output_norm = norm() if slots.output_norm else None
        self.post_norm = norm() if slots.post_norm else None
        self.residual_alpha = spec.residual_alpha
        self.input_scale = spec.input_scale
        self.init_gain = init_gain  # read by init.init_weights
        self.dropout = nn.Dropout(cfg.dropout)

    def transform(self, h: torch.Tensor, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        h = x
        if self.pre_norm is not None:
            h = self.pre_norm(x)
            if self.input_scale != 1.0:
                h = h * self.input_scale
        y = self.dropout(self.transform(h, **kwargs))
        if self.output_norm is not None:
            y = self.output_norm(y)
        x = x * self.residual_alpha + y if self.residual_alpha != 1.0 else x + y
        return self.post_norm(x) if self.post_norm is not None else x


class Attention(ResidualSublayer):
    """Multi-head or grouped-query (self or cross) attention through its core."""

    def __init__(self, cfg: ModelConfig, slots: SublayerSlots, spec: LayerSpec, init_gain: float,
                 causal: bool):
        super().__init__(cfg, slots, spec, init_gain)
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=cfg.bias)
        # GQA: num_query_groups key/value heads (kv_size wide), each serving num_heads /
        # num_query_groups consecutive query heads (Megatron's and Llama's order)
        self.k_proj = nn.Linear(d, cfg.kv_size, bias=cfg.bias)
        self.v_proj = nn.Linear(d, cfg.kv_size, bias=cfg.bias)
        self.out_proj = nn.Linear(d, d, bias=cfg.bias)
        # QK-norm per head (width head_dim, one gain shared by every head, as Qwen3, Gemma 3 and
        # megatron-core's qk_layernorm; OLMo 2 normalizes the whole projection instead). A
        # head's logit q_h.k_h is what blows up; per head it is bounded by the gains, where a
        # norm over the whole projection bounds only the sum over heads. It is also local under
        # TP (every rank holds whole heads): no all-reduce in forward (parallel/tensor_parallel
        # sums the gain's gradient).
        self.q_norm = make_norm(cfg.norm_type, hd, cfg.norm_eps) if slots.qk_norm else None
        self.k_norm = make_norm(cfg.norm_type, hd, cfg.norm_eps) if slots.qk_norm else None
        # Sub-LN: normalizes the merged heads (width d) before W_o.
        self.inner_norm = make_norm(cfg.norm_type, d, cfg.norm_eps) if slots.inner_norm else None
        self.head_scale = nn.Parameter(torch.ones(cfg.num_heads)) if slots.head_scale else None
        self.head_dim = hd
        self.softmax_scale = spec.attention_scale  # None: SDPA's 1/sqrt(head_dim)
        self.causal = causal
        self.attn_dropout = cfg.dropout
        # softmax(q k^T * scale) v; context parallelism swaps in its ring attention
        self.core = DotProductAttention()
        # Where attention dropout draws its mask; tensor parallelism points this at a per-rank
        # stream (its heads differ by rank), see magneto_dist/parallel/random.py.
        self.dropout_rng = contextlib.nullcontext

    def transform(self, h, memory: Optional[torch.Tensor] = None,
                  mask: Optional[torch.Tensor] = None, rope=None,
                  documents: Optional[Documents] = None) -> torch.Tensor:
        """h: [b, s, d]; memory: [b, t, d] for cross-attention; mask: bool, True = may attend;
        documents: packed documents that must not attend to each other."""
        b, s, _ = h.shape
        kv = h if memory is None else memory
        t = kv.shape[1]
        q = self.q_proj(h).view(b, s, -1, self.head_dim)                   # [b, s, heads, hd]
        k = self.k_proj(kv).view(b, t, -1, self.head_dim)                  # [b, t, groups, hd]
        v = self.v_proj(kv).view(b, t, -1, self.head_dim).transpose(1, 2)  # [b, groups, t, hd]
        if self.q_norm is not None:  # before RoPE, which rotates but keeps each head's norm
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        with self.dropout_rng():  # k, v keep their groups: a ring carries only those
            y = self.core(q, k, v, causal=self.causal, key_mask=mask, documents=documents,
                          dropout_p=self.attn_dropout if self.training else 0.0,
                          scale=self.softmax_scale)                        # [b, heads, s, hd]
        if self.head_scale is not None:
            y = y * self.head_scale.view(1, -1, 1, 1).to(y.dtype)
        y = y.transpose(1, 2).reshape(b, s, -1)                            # [b, s, d]
        if self.inner_norm is not None:
            y = self.inner_norm(y)
        return self.out_proj(y)


class FeedForward(ResidualSublayer):
    """W_2 [inner_norm] act(W_1 x); SwiGLU uses silu(gate x) * (W_1 x)."""

    def __init__(self, cfg: ModelConfig, slots: SublayerSlots, spec: LayerSpec):
        super().__init__(cfg, slots, spec, spec.init_gain)
        d, f = cfg.hidden_size, cfg.ffn_hidden_size
        self.fc1 = nn.Linear(d, f, bias=cfg.bias)
        self.fc1_gate = nn.Linear(d, f, bias=cfg.bias) if cfg.activation == "swiglu" else None
        # Sub-LN: normalizes the FFN hidden activation (width ffn) before W_2.
        self.inner_norm = make_norm(cfg.norm_type, f, cfg.norm_eps) if slots.inner_norm else None
        self.fc2 = nn.Linear(f, d, bias=cfg.bias)

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        if self.fc1_gate is not None:
            hidden = F.silu(self.fc1_gate(h)) * self.fc1(h)  # [b, s, ffn]
        else:
            hidden = F.gelu(self.fc1(h))                     # [b, s, ffn]
        if self.inner_norm is not None:
            hidden = self.inner_norm(hidden)
        return self.fc2(hidden)


class TransformerLayer(nn.Module):
    """Self-attention, optional cross-attention, FFN; the spec decides where the norms sit."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.self_attn = Attention(cfg, spec.attention, spec, spec.init_gain, causal=spec.causal)
        self.cross_attn = (Attention(cfg, spec.cross_attention, spec, spec.cross_init_gain,
                                     causal=False)
                           if spec.cross_attention is not None else None)
        self.ffn = FeedForward(cfg, spec.ffn, spec)

    def forward(self, x, mask=None, rope=None, memory=None, memory_mask=None, documents=None):
        x = self.self_attn(x, mask=mask, rope=rope, documents=documents)
        if self.cross_attn is not None:
            x = self.cross_attn(x, memory=memory, mask=memory_mask)
        return self.ffn(x)
