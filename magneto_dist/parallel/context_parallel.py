"""Context parallelism: each rank of a CP group holds 1/CP of every sequence; attention runs as
a ring over the group.

Layout (megatron-core's and torchtitan's load balancing): the sequence is cut into 2 x CP equal
chunks and CP rank r holds chunks r and 2CP-1-r, a head and a tail. Under a causal mask a
query attends to every key before it, so chunk i costs i+1 chunk-pairs of work; the head-and-
tail pairing gives every rank (r+1) + (2CP-r) = 2CP+1 of them, where contiguous slices would
leave rank 0 with 1 and rank CP-1 with 2CP-1. Positions (RoPE, learned) follow each chunk's
global offset: shard_batch gives the model position_ids.

Attention (RingAttention, the `core` slot of each self-attention): queries stay; the keys and
values of each rank travel round the ring, CP-1 hops, each block of queries x keys computed as
it arrives (the exchange of the next block overlaps the current one's arithmetic) and merged
by its log-sum-exp (the online softmax). Backward sends the keys and values round again with
their gradients accumulating beside them, back to their owners. No rank ever holds more than
two ranks' keys and values, so activation memory per rank falls as 1/CP. Under grouped-query
attention the ring carries the key/value groups only (heads / groups times fewer bytes than
the heads), repeated to the query heads tile by tile, and their gradients summed back per group.

Why written here: torch's context_parallel (torch.distributed.tensor.experimental) fails on a
CPU ("aten._scaled_dot_product_flash_attention_for_cpu has no sharding strategy", torch
2.13) and takes no document mask; megatron-core's CP needs Transformer Engine, which has no
CPU build. The ring below is plain torch: matmuls and batch_isend_irecv, on gloo and NCCL.
It computes each block's scores explicitly (a [chunk x chunk] tile per head, never the
sequence x sequence matrix); on GPUs a fused kernel that returns the log-sum-exp
(flash-attn's) would do the same blocks faster.

Gradients: every parameter is replicated over CP and receives the gradient of its rank's
tokens only; DeepSpeed averages gradients over DP x CP (parallel/state.py's two data-parallel
groups), and the loss of a rank is its tokens' loss sum over the CP group's token count x CP
(training/tasks.py), so the average is the loss of the whole sequence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..model.attention import repeat_kv, sum_kv_groups
from ..model.layers import Attention
from . import state

# The per-token fields of a GPT batch, cut along the sequence (dim 1) for each CP rank.
SEQUENCE_FIELDS = ("tokens", "labels", "loss_mask", "position_ids", "document_ids")


def chunk_bounds(rank: int, size: int, seq_len: int) -> List[Tuple[int, int]]:
    """[(start, end)] of the head and tail chunks CP rank `rank` holds, in global positions."""
    c = seq_len // (2 * size)
    return [(rank * c, (rank + 1) * c), ((2 * size - 1 - rank) * c, (2 * size - rank) * c)]


def local_positions(rank: int, size: int, seq_len: int, device=None) -> torch.Tensor:
    """The global positions of this rank's tokens, in the order it holds them."""
    return torch.cat([torch.arange(a, b, device=device)
                      for a, b in chunk_bounds(rank, size, seq_len)])


def shard_batch(batch: Dict[str, torch.Tensor], rank: int, size: int) -> Dict[str, torch.Tensor]:
    """This CP rank's chunks of every per-token field; position_ids are filled in (0 .. s-1
    before the cut) when the batch has none, so the model sees each chunk's global offset."""
    tokens = batch["tokens"]
    if "position_ids" not in batch:
        batch = {**batch, "position_ids": torch.arange(tokens.shape[1], device=tokens.device)
                 .expand_as(tokens)}
    index = local_positions(rank, size, tokens.shape[1], tokens.device)
    return {k: v.index_select(1, index) if k in SEQUENCE_FIELDS and torch.is_tensor(v) else v
            for k, v in batch.items()}


def context_parallel_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """This rank's share of the masked mean over the CP group's tokens: its sum over the
    group's count, times CP, so that the mean of the group's values (DeepSpeed's gradient
    average, the logged loss) is the masked mean of the whole sequences. Each rank's own mean
    would weigh its chunks' tokens by its own count, which loss masks make unequal."""
    group = state.cp_group()
    mask = mask.float()
    count = mask.sum().detach().clone()
    dist.all_reduce(count, group=group)
    return (per_token * mask).sum() * dist.get_world_size(group) / count.clamp(min=1.0)


class Ring:
    """This rank's place in the CP group and the neighbour exchange of each hop."""

    def __init__(self, group):
        self.group = group
        ranks = dist.get_process_group_ranks(group)
        self.rank, self.size = dist.get_rank(group), len(ranks)
        self.next, self.prev = ranks[(self.rank + 1) % self.size], ranks[self.rank - 1]

    def start(self, tensors: List[torch.Tensor]):
        """Send `tensors` to the next rank and receive the previous rank's; -> (received,
        handle): wait(handle) before reading them."""
        tensors = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in tensors]
        ops = ([dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
               + [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in received])
        return received, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(handle) -> None:
        for request in handle:
            request.wait()

    def source(self, hop: int) -> int:
        """The CP rank whose keys and values this rank holds after `hop` hops."""
        return (self.rank - hop) % self.size


# --- one block: queries of one chunk against keys of one chunk -------------------------------

FULL, DIAGONAL = "full", "diagonal"
# Scores, softmax statistics and gradients are accumulated in fp32 whatever the activations'
# dtype (bf16 blocks summed over CP hops would lose the merge's precision), as flash kernels do.
ACC = torch.float32


def block_kind(q: Tuple[int, int], k: Tuple[int, int], causal: bool) -> Optional[str]:
    """How chunk q's queries see chunk k's keys (both (start, end) of the 2 x CP chunks): FULL,
    DIAGONAL (the same chunk: causal inside it) or None (every key after every query)."""
    if not causal or q[0] >= k[1]:
        return FULL
    return DIAGONAL if q == k else None


def block_scores(q, k, scale: float, causal_offset: Optional[int], q_docs,
                 k_docs) -> torch.Tensor:
    """fp32 scores [b, h, nq, nk] of one tile, masked entries -inf: query i sees key j only if
    j <= i + causal_offset (None: every key), and with document ids q_docs [b, nq] / k_docs
    [b, nk] only the keys of its own document."""
    scores = torch.matmul(q.to(ACC), k.to(ACC).transpose(-1, -2)) * scale
    allowed = None
    if causal_offset is not None:
        rows = torch.arange(q.shape[2], device=q.device)[:, None] + causal_offset
        allowed = rows >= torch.arange(k.shape[2], device=q.device)[None, :]    # [nq, nk]
    if q_docs is not None:
        same = (q_docs[:, :, None] == k_docs[:, None, :])[:, None]        # [b, 1, nq, nk]
        allowed = same if allowed is None else allowed & same
    return scores if allowed is None else scores.masked_fill(~allowed, float("-inf"))


def _exp_minus(scores: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(scores - lse) [b, h, cq, ck] for lse [b, h, cq]; 0 on rows that see no key
    (lse = -inf, where the difference would be NaN)."""
    lse = lse.unsqueeze(-1)
    return torch.where(torch.isinf(lse), torch.zeros_like(scores), torch.exp(scores - lse))


def merge(out, lse, block_out, block_lse):
    """Two softmax-attention results over disjoint keys (each normalized by its own log-sum-exp
    lse [b, h, c]) -> the result over their union, and its log-sum-exp."""
    both = torch.logaddexp(lse, block_lse)
    seen = ~torch.isinf(both)  # rows that see a key in either part

    def weight(part):
        return torch.where(seen, torch.exp(part - both), torch.zeros_like(both)).unsqueeze(-1)
    return out * weight(lse) + block_out * weight(block_lse), both


def _chunk(docs: Optional[torch.Tensor], index: slice) -> Optional[torch.Tensor]:
    return None if docs is None else docs[:, index]


# The scores of one tile (and their softmax and gradient, alive together in backward) are
# fp32 [b, heads, rows, chunk]: a chunk's queries go in tiles of rows small enough that one such
# tensor stays under this (at 32k tokens over CP2, a whole 8k-query chunk against an 8k-key
# chunk would be 2 GiB per 8 heads).
TILE_BYTES = 256 * 2 ** 20


@dataclass(frozen=True)
class Tile:
    rows: slice                    # this rank's queries (local positions)
    cols: slice                    # the held keys (local positions of their owner)
    causal_offset: Optional[int]   # query i sees key j iff j <= i + offset; None: all keys


def _tiles(ring: "Ring", hop: int, q: torch.Tensor, causal: bool) -> Iterator[Tile]:
    """The tiles to compute at `hop`: this rank's two chunks of queries against the two chunks
    of keys it holds (those of CP rank ring.source(hop)), skipping chunk pairs with every key
    after every query, and in a chunk's own diagonal block the keys after the tile's last
    query."""
    b, heads, local, _ = q.shape
    c, seq = local // 2, local * ring.size
    step = max(1, TILE_BYTES // (4 * b * heads * c))
    mine, theirs = (chunk_bounds(r, ring.size, seq) for r in (ring.rank, ring.source(hop)))
    for qi, qc in enumerate(mine):
        for ki, kc in enumerate(theirs):
            kind = block_kind(qc, kc, causal)
            for start in range(0, c, step) if kind is not None else ():
                end = min(c, start + step)
                keys = end if kind == DIAGONAL else c
                yield Tile(slice(qi * c + start, qi * c + end), slice(ki * c, ki * c + keys),
                           start if kind == DIAGONAL else None)


# --- the ring ----------------------------------------------------------------------------

class _RingAttention(torch.autograd.Function):
    """q [b, h, 2c, hd], k, v [b, g, 2c, hd] (this rank's head and tail chunks; g = h, or
    GQA's g key/value groups, which is all the ring carries) -> [b, h, 2c, hd]; docs [b, 2c]
    (document ids, or None)."""

    @staticmethod
    def forward(ctx, q, k, v, docs, ring: Ring, causal: bool, scale: float):
        out = torch.zeros(q.shape, dtype=ACC, device=q.device)
        heads = q.shape[1]
        lse = torch.full(q.shape[:3], float("-inf"), device=q.device)        # [b, h, 2c]
        held = (k, v, docs)  # the keys, values and their document ids this rank holds now
        for hop in range(ring.size):
            if hop < ring.size - 1:  # the next rank's block travels while this one computes
                arriving, handle = ring.start([t for t in held if t is not None])
            for tile in _tiles(ring, hop, q, causal):
                rows, cols = tile.rows, tile.cols
                kb, vb = (repeat_kv(t[:, :, cols], heads) for t in held[:2])  # [b, h, nk, hd]
                scores = block_scores(q[:, :, rows], kb, scale, tile.causal_offset,
                                      _chunk(docs, rows), _chunk(held[2], cols))
                block_lse = torch.logsumexp(scores, dim=-1)
                block_out = torch.matmul(_exp_minus(scores, block_lse), vb.to(ACC))
                out[:, :, rows], lse[:, :, rows] = merge(out[:, :, rows], lse[:, :, rows],
                                                         block_out, block_lse)
            if hop < ring.size - 1:
                ring.wait(handle)
                held = (*arriving[:2], arriving[2] if docs is not None else None)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, docs)
        ctx.ring, ctx.causal, ctx.scale = ring, causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, docs = ctx.saved_tensors
        ring, causal, scale = ctx.ring, ctx.causal, ctx.scale
        grad_out = grad_out.to(ACC)
        heads, groups = q.shape[1], k.shape[1]
        delta = (grad_out * out.to(ACC)).sum(-1, keepdim=True)              # [b, h, 2c, 1]
        dq = torch.zeros(q.shape, dtype=ACC, device=q.device)
        held = (k, v, docs)
        dkv = dkv_handle = None
        for hop in range(ring.size):
            if hop < ring.size - 1:
                arriving, handle = ring.start([t for t in held if t is not None])
            dk = torch.zeros(k.shape, dtype=ACC, device=k.device)
            dv = torch.zeros_like(dk)
            for tile in _tiles(ring, hop, q, causal):
                rows, cols = tile.rows, tile.cols
                kb, vb = (repeat_kv(t[:, :, cols], heads).to(ACC) for t in held[:2])
                scores = block_scores(q[:, :, rows], kb, scale, tile.causal_offset,
                                      _chunk(docs, rows), _chunk(held[2], cols))
                p = _exp_minus(scores, lse[:, :, rows])                       # [b, h, c, c]
                g = grad_out[:, :, rows]
                dv[:, :, cols] += sum_kv_groups(torch.matmul(p.transpose(-1, -2), g), groups)
                ds = p * (torch.matmul(g, vb.transpose(-1, -2)) - delta[:, :, rows])
                dq[:, :, rows] += torch.matmul(ds, kb) * scale
                dk[:, :, cols] += sum_kv_groups(torch.matmul(
                    ds.transpose(-1, -2), q[:, :, rows].to(ACC)), groups) * scale
            if dkv_handle is not None:  # these keys' gradients from the ranks before this one
                ring.wait(dkv_handle)
                dk, dv = dk + dkv[0], dv + dkv[1]
            # on to the next rank, which holds these keys at the next hop; after the last hop
            # it is their owner, and what arrives here is this rank's own, complete
            dkv, dkv_handle = ring.start([dk, dv])
            if hop < ring.size - 1:
                ring.wait(handle)
                held = (*arriving[:2], arriving[2] if docs is not None else None)
        ring.wait(dkv_handle)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


class RingAttention(nn.Module):
    """The attention core under context parallelism (same call as DotProductAttention)."""

    def __init__(self, group):
        super().__init__()
        self.ring = Ring(group)

    def forward(self, q, k, v, causal: bool, key_mask=None, documents=None,
                dropout_p: float = 0.0, scale: Optional[float] = None) -> torch.Tensor:
        if key_mask is not None or dropout_p:
            raise ValueError("context parallelism supports causal self-attention without a "
                             "padding mask or attention dropout")
        scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        docs = documents.ids if documents is not None else None
        return _RingAttention.apply(q, k, v, docs, self.ring, causal, scale)


def apply_context_parallel(model: nn.Module, group) -> None:
    """Every self-attention of `model` attends over the CP group's whole sequence."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.core = RingAttention(group)
