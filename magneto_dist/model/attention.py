"""The attention core: softmax(q k^T * scale + mask) v, with the masks a model needs.

A module of its own (the `core` slot of every Attention sublayer) so that parallelism can swap
it without the model knowing: context parallelism puts a ring attention over the CP group in
its place (parallel/context_parallel.py), with the same call.

Masks: causal (decoders), a key padding mask (encoders, cross-attention) and documents:
packed sequences whose documents must not see each other (Megatron-LM's
--reset-attention-mask). A document mask is block-causal: query i sees key j iff j <= i and
both lie in the same document. On a GPU it runs through FlexAttention with a block mask, which
never materializes the sequence x sequence mask (at 32k tokens a dense boolean mask is 1 GiB
per sample) and skips the blocks it masks; on a CPU, through scaled_dot_product_attention with
the dense mask (FlexAttention on a CPU compiles a kernel per shape through inductor, 10 s
here, for tiny models and tests). Both give the same numbers (tests/test_attention.py).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class Documents:
    """The document index of every position of a batch of packed sequences, and the masks
    built from it, once per forward pass and shared by every layer."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids                     # [b, s] int: the document of each position
        self._dense: Optional[torch.Tensor] = None
        self._block = None

    @classmethod
    def shared(cls, ids: torch.Tensor) -> "Documents":
        """The Documents of `ids`, built once for consecutive callers with the same tensor: a
        pipeline stage's layers each get the ids (they travel with the activations) and share
        the one mask. Holds only the last one."""
        last = _LAST_SHARED.get("documents")
        if last is None or last.ids is not ids:
            last = _LAST_SHARED["documents"] = cls(ids)
        return last

    def dense(self) -> torch.Tensor:
        """[b, 1, s, s] bool, True where query i may attend key j (block-causal)."""
        if self._dense is None:
            s = self.ids.shape[1]
            causal = torch.ones(s, s, dtype=torch.bool, device=self.ids.device).tril()
            self._dense = (causal & (self.ids[:, :, None] == self.ids[:, None, :]))[:, None]
        return self._dense

    def block_mask(self):
        """FlexAttention's BlockMask of the same mask, built blockwise (create_block_mask
        compiled, as torchtitan does: uncompiled it evaluates the mask on every (i, j))."""
        if self._block is None:
            ids = self.ids
            b, s = ids.shape

            def block_causal(batch, head, q, k):
                return (q >= k) & (ids[batch, q] == ids[batch, k])

            self._block = _create_block_mask()(block_causal, b, None, s, s,
                                               device=ids.device)
        return self._block


_LAST_SHARED: dict = {}


def documents_from_tokens(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[b, s] document index of each position: the end-of-document token closes its document
    (it belongs to the document before it), as Megatron-LM's --reset-attention-mask masks."""
    ends = (tokens == eod).long()
    return ends.cumsum(dim=1) - ends


@functools.lru_cache(maxsize=None)
def _create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask
    return torch.compile(create_block_mask)


@functools.lru_cache(maxsize=None)
def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention)


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """GQA: [b, groups, t, hd] -> [b, heads, t, hd], group g serving query heads g * r .. g * r +
    r - 1 (r = heads / groups); the local counts under TP, which splits groups as it splits
    heads."""
    groups = x.shape[1]
    return x if groups == heads else x.repeat_interleave(heads // groups, dim=1)


def sum_kv_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """The adjoint of repeat_kv: [b, heads, t, hd] -> [b, groups, t, hd], each group the sum
    over the query heads it serves (the gradient of its repeated copies)."""
    b, heads, t, hd = x.shape
    return x if groups == heads else x.view(b, groups, heads // groups, t, hd).sum(2)


class DotProductAttention(nn.Module):
    """q [b, h, s, hd], k and v [b, g, t, hd] -> [b, h, s, hd]; g = h, or g key/value groups
    (GQA), repeated here, after any communication of k and v.

    key_mask: bool, True = may attend, broadcastable to [b, h, s, t] (padding); documents:
    block-causal document masking of a causal self-attention. `flex` chooses FlexAttention
    for documents (default: on CUDA tensors)."""

    def __init__(self, flex: Optional[bool] = None):
        super().__init__()
        self.flex = flex

    def forward(self, q, k, v, causal: bool, key_mask: Optional[torch.Tensor] = None,
                documents: Optional[Documents] = None, dropout_p: float = 0.0,
                scale: Optional[float] = None) -> torch.Tensor:
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])           # [b, h, t, hd]
        if documents is not None:
            if key_mask is not None or not causal:
                raise ValueError("document masking is for causal self-attention without a "
                                 "padding mask")
            if self.flex if self.flex is not None else q.is_cuda:
                if dropout_p:
                    raise ValueError("FlexAttention has no attention dropout")
                return _flex_attention()(q, k, v, block_mask=documents.block_mask(),
                                         scale=scale)
            key_mask = documents.dense()
        elif causal and key_mask is not None:  # SDPA takes a mask or is_causal, not both
            s, t = q.shape[2], k.shape[2]
            key_mask = key_mask & torch.ones(s, t, dtype=torch.bool, device=q.device).tril()
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, dropout_p=dropout_p, scale=scale,
            is_causal=causal and key_mask is None)
