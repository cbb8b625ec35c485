"""Tensor parallelism applied to a built model: megatron-core layers swapped in, weights sliced.

Q/K/V and W_1 (and the SwiGLU gate) become column-parallel, W_o and W_2 row-parallel, so each
rank holds num_heads/TP heads and ffn/TP hidden units; the embedding, LM head and cross-entropy
become vocab-parallel. The TP modules are made on the meta device, shard-shaped and marked, and
materialize.py fills each with its slice of the full parameter, so a TP run starts from exactly
the single-process weights without any rank holding the full model. Parameter names do not
change.

What megatron-core lacks, written here: the Sub-LN (and NormFormer FFN) norms, whose inputs TP
has split along the normalized dimension. ShardedLayerNorm / ShardedRMSNorm all-reduce per-token
(sum x, sum x^2) across the TP group, normalize their own slice and keep only their slice of the
gain and bias; the all-reduce's backward all-reduces the gradient, which is the matching
backward.

Also here: the QK-norm gains (one per head dimension, shared by the heads that ranks hold in
parts), whose gradient is summed over TP, and the logsumexp over the whole vocabulary from each
rank's slice of the logits (train.z_loss).

Sequence parallelism (sequence_parallel=True, sequence_parallel.py) changes the borders of the TP
region: a column-parallel layer takes an input already gathered along the sequence and does not
all-reduce its input gradient (the gather's backward reduce-scatters it), a row-parallel layer
reduce-scatters its output along the sequence instead of all-reducing it, and the LM head
gathers its input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, tensor_parallel
from torch import nn

from ..compat.megatron import NoExtraState
from ..model.layers import Attention
from ..model.norms import LayerNorm, RMSNorm
from . import state
from .materialize import is_meta, materialize, own_weights
from .sequence_parallel import (apply_sequence_parallel_regions, gather_sequence,
                                mark_sequence_parallel, reduce_grads_over_tp,
                                reduce_scatter_sequence, sequence_parallel_form)
from .tp_plan import (COLUMN, REPLICATED, ROW, SHARD_DIM, SLICED, VOCAB, padded_vocab_size,
                      tp_kind)


def _megatron_config(tp: int, dtype: torch.dtype) -> ModelParallelConfig:
    # Weights are filled by materialize.py, so megatron-core's own init is skipped. Its
    # sequence_parallel stays off even under SP: its SP collectives split dim 0 of [s, b, h]
    # and allocate on CUDA (sequence_parallel.py has this model's).
    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               perform_initialization=False, params_dtype=dtype,
                               sequence_parallel=False, gradient_accumulation_fusion=False)


def _noop_init(weight):
    return weight


# NoExtraState: a state dict of parameters only; megatron's `_extra_state: None` entries crash
# DeepSpeed's universal-checkpoint converter.
class ColumnLinear(NoExtraState, tensor_parallel.ColumnParallelLinear):
    def forward(self, x):  # megatron returns (output, bias); the bias is already added
        return super().forward(x)[0]


class RowLinear(NoExtraState, tensor_parallel.RowParallelLinear):
    def forward(self, x):
        return super().forward(x)[0]


class SequenceParallelRowLinear(RowLinear):
    """Row-parallel under SP: the partial sums are reduce-scattered along the sequence instead
    of all-reduced, and the replicated bias is added to this rank's part of it. The add is
    written in fp32 (a bf16 add rounds the same fp32 sum) so that the bias gradient is summed
    over TP in fp32 and rounded once, as a single rank's is."""

    def forward(self, x):                                   # [b, s, in/tp] -> [b, s/tp, out]
        y = reduce_scatter_sequence(F.linear(x, self.weight))
        if self.bias is None:
            return y
        (bias,) = reduce_grads_over_tp(self.bias.float())
        return (y.float() + bias).type_as(y)


class VocabEmbedding(NoExtraState, tensor_parallel.VocabParallelEmbedding):
    pass


def _mark(param: nn.Parameter, kind: str) -> None:
    """Mark a parameter as TP-sharded along its kind's dimension. megatron-core sets the marks
    only inside its own init (skipped here); DeepSpeed's grad norm counts an unmarked parameter
    once per TP group, as if replicated, and so clips wrongly."""
    # set directly: megatron's setter asserts the marks are unset, and it marks biases itself
    param.tensor_model_parallel, param.partition_dim, param.partition_stride = (
        True, SHARD_DIM[kind], 1)


def column_from(linear: nn.Linear, config, sequence_parallel: bool = False) -> ColumnLinear:
    # under SP the input arrives gathered, and the gather's backward sums the input gradient
    tp_linear = ColumnLinear(linear.in_features, linear.out_features, config=config,
                             init_method=_noop_init, bias=linear.bias is not None,
                             gather_output=False, disable_grad_reduce=sequence_parallel)
    for param in (tp_linear.weight, tp_linear.bias):
        if param is not None:
            _mark(param, COLUMN)
    return tp_linear


def row_from(linear: nn.Linear, config, sequence_parallel: bool = False) -> RowLinear:
    # the bias is added after the all-reduce (or reduce-scatter): replicated, unmarked
    cls = SequenceParallelRowLinear if sequence_parallel else RowLinear
    tp_linear = cls(linear.in_features, linear.out_features, config=config,
                    init_method=_noop_init, bias=linear.bias is not None,
                    input_is_parallel=True, skip_bias_add=False)
    _mark(tp_linear.weight, ROW)
    if sequence_parallel:
        mark_sequence_parallel(tp_linear)
    return tp_linear


class _SumOverTP(torch.autograd.Function):
    """All-reduce in forward and in backward. Every rank uses the summed statistics for its own
    slice only, so the true gradient of a rank's partial sum is the sum of all ranks' gradients.
    (megatron-core's reduce_from_tensor_model_parallel_region has an identity backward, right
    only when everything downstream is replicated.)"""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        torch.distributed.all_reduce(x, group=state.tp_group())
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=state.tp_group())
        return grad


def _tp_sum(x: torch.Tensor) -> torch.Tensor:
    return _SumOverTP.apply(x)


class _ShardedNorm:
    """Mixin: shaped after the full norm, holding this rank's slice of its gain (and bias)."""

    def __init__(self, full: nn.Module):
        width = full.normalized_shape[0]
        super().__init__(width // state.tp_size(), eps=full.eps)
        self.full_width = width
        for name in ("weight", "bias"):
            if getattr(self, name, None) is not None:
                _mark(getattr(self, name), SLICED)


class ShardedLayerNorm(_ShardedNorm, LayerNorm):
    """LayerNorm over a dimension split across TP ranks; holds this rank's slice of gain/bias."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()                                                       # [..., d/tp]
        sums = _tp_sum(torch.stack([xf.sum(-1), (xf * xf).sum(-1)], dim=-1))  # [..., 2]
        mean = (sums[..., 0] / self.full_width).unsqueeze(-1)
        # E[x^2] - E[x]^2 cancels: for a row of near-equal values far from zero it comes out
        # below zero in fp32, and rsqrt(negative + eps) is NaN where the true variance is ~0
        # (a one-pass form; the two-pass one would cost a second all-reduce per norm)
        var = ((sums[..., 1] / self.full_width).unsqueeze(-1) - mean * mean).clamp_min(0.0)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        return (y * self.weight.float() + self.bias.float()).type_as(x)


class ShardedRMSNorm(_ShardedNorm, RMSNorm):
    """RMSNorm over a dimension split across TP ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        mean_square = (_tp_sum((xf * xf).sum(-1)) / self.full_width).unsqueeze(-1)
        return (xf * torch.rsqrt(mean_square + self.eps) * self.weight.float()).type_as(x)


def sharded_norm(norm: nn.Module) -> nn.Module:
    return ShardedRMSNorm(norm) if isinstance(norm, RMSNorm) else ShardedLayerNorm(norm)


class _HeadNorm:
    """Mixin: a QK-norm under TP. It normalizes each head over head_dim, so its forward is
    local, but its one gain (and bias) serves every head and a rank sees only its own heads:
    the parameters pass through copy_to_tensor_model_parallel_region (identity forward,
    all-reduce of the gradient), so every rank steps on the gradient over all heads, as
    megatron-core sums its q_layernorm / k_layernorm gradients over TP (finalize_model_grads).
    Left alone, each rank's gain would drift apart from the others' with its own heads'
    gradient."""

    def __init__(self, full: nn.Module):
        super().__init__(full.normalized_shape[0], eps=full.eps)
        # marked as the SP region's parameters are (megatron-core's TE norms mark their q/k
        # layernorms alike): the gradient is summed over TP where the norm uses it, so SP's
        # check of the parameters past its split passes them (summing again would double it)
        mark_sequence_parallel(self)

    def affine(self):
        weight, bias = super().affine()
        tp_sum_grad = tensor_parallel.copy_to_tensor_model_parallel_region
        return tp_sum_grad(weight), (tp_sum_grad(bias) if bias is not None else None)


class HeadLayerNorm(_HeadNorm, LayerNorm):
    pass


class HeadRMSNorm(_HeadNorm, RMSNorm):
    pass


def head_norm_from(norm: nn.Module) -> nn.Module:
    return HeadRMSNorm(norm) if isinstance(norm, RMSNorm) else HeadLayerNorm(norm)


def _replicate_head_norms(model: nn.Module) -> None:
    """Swap every attention's QK-norms for their TP form (on the meta device, like the rest)."""
    for module in model.modules():
        if isinstance(module, Attention) and module.q_norm is not None:
            module.q_norm = head_norm_from(module.q_norm)
            module.k_norm = head_norm_from(module.k_norm)


def vocab_embedding_from(embedding: nn.Embedding, padded: int, config) -> VocabEmbedding:
    """Padded rows are zero (materialize.py) and never looked up (no token has their id)."""
    tp_embedding = VocabEmbedding(padded, embedding.weight.shape[1], init_method=_noop_init,
                                  config=config)
    _mark(tp_embedding.weight, VOCAB)
    return tp_embedding


class VocabHead(ColumnLinear):
    """The LM head over this rank's vocabulary slice: [b, s, d] -> [b, s, V_padded / tp]."""


class SequenceParallelVocabHead(VocabHead):
    """The LM head under SP: gathers its input [b, s/tp, d] along the sequence first."""

    def forward(self, x):
        return super().forward(gather_sequence(x))


def vocab_head_from(head: nn.Linear, padded: int, config, tied_to=None,
                    sequence_parallel: bool = False) -> VocabHead:
    cls = SequenceParallelVocabHead if sequence_parallel else VocabHead
    tp_head = cls(head.in_features, padded, config=config, init_method=_noop_init, bias=False,
                  gather_output=False, disable_grad_reduce=sequence_parallel)
    if tied_to is not None:
        tp_head.weight = tied_to.weight  # same [V_padded/tp, d] slice as the embedding
    else:
        _mark(tp_head.weight, VOCAB)
    return tp_head


def _unpadded_slice(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """This rank's logit slice [b, s, V_padded/tp] in fp32, its padded entries -inf (no
    probability mass there)."""
    local = logits.shape[-1]
    first = state.tp_rank() * local
    logits = logits.float()
    if first + local > vocab_size:
        ids = torch.arange(first, first + local, device=logits.device)
        logits = logits.masked_fill(ids >= vocab_size, float("-inf"))
    return logits


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int):
    """Per-token CE from this rank's logit slice [b, s, V_padded/tp]; padded entries excluded.
    megatron-core overwrites an fp32 slice in place (its exp): read the logits before this."""
    return tensor_parallel.vocab_parallel_cross_entropy(_unpadded_slice(logits, vocab_size),
                                                        labels)


def vocab_parallel_logsumexp(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log Z = logsumexp over the whole vocabulary, per token [b, s], from this rank's slice
    [b, s, V_padded/tp]: the global max (a constant: log Z does not depend on it), then the sum
    of exp(logit - max) over ranks. That sum's all-reduce has an identity backward
    (reduce_from_tensor_model_parallel_region): every rank computes the same loss from it, so
    the gradient of a rank's partial sum is the loss's gradient, once."""
    logits = _unpadded_slice(logits, vocab_size)
    top = logits.detach().amax(dim=-1)                                      # [b, s]
    torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=state.tp_group())
    partial = (logits - top.unsqueeze(-1)).exp().sum(dim=-1)                # [b, s]
    return top + tensor_parallel.reduce_from_tensor_model_parallel_region(partial).log()


class FullLogits(nn.Module):
    """Gathers the vocab-parallel logits, for sampling from a causal TP model (no gradient;
    megatron's gather_from_tensor_model_parallel_region allocates on CUDA). Under SP a window
    that TP does not divide is padded at its end and its logits cut back: a causal model's
    positions never see the ones after them."""

    def __init__(self, model: nn.Module, sequence_parallel: bool = False):
        super().__init__()
        self.model = model
        self.sequence_parallel = sequence_parallel

    @torch.no_grad()
    def forward(self, tokens):
        length = tokens.shape[1]
        if self.sequence_parallel:
            tokens = F.pad(tokens, (0, -length % state.tp_size()))
        local = self.model(tokens)[:, :length].contiguous()        # [b, s, V_padded/tp]
        parts = [torch.empty_like(local) for _ in range(state.tp_size())]
        torch.distributed.all_gather(parts, local, group=state.tp_group())
        return torch.cat(parts, dim=-1)                            # [b, s, V_padded]


def _shard_children(module: nn.Module, prefix: str, config, sequence_parallel: bool) -> None:
    """Swap this module's Linear and norm children, and slice its own 1-D parameters (head
    scales), each as the TP plan says; under SP the replicated ones (outer norms, BERT's MLM
    dense) become their SP-region forms."""
    swaps = {COLUMN: column_from, ROW: row_from}
    for name, child in list(module.named_children()):
        if not isinstance(child, (nn.Linear, LayerNorm, RMSNorm)):
            continue
        kind = tp_kind(f"{prefix}{name}.weight")
        if isinstance(child, nn.Linear) and kind in swaps:
            setattr(module, name, swaps[kind](child, config, sequence_parallel))
        elif isinstance(child, (LayerNorm, RMSNorm)) and kind == SLICED:
            setattr(module, name, sharded_norm(child))
        elif sequence_parallel and kind == REPLICATED:
            setattr(module, name, sequence_parallel_form(child))
    if isinstance(module, (nn.Linear, nn.Embedding, LayerNorm, RMSNorm)):
        return  # their parameters were handled with the module itself
    for name, param in list(module.named_parameters(recurse=False)):
        if tp_kind(f"{prefix}{name}") == SLICED:
            sliced = nn.Parameter(torch.empty(param.numel() // state.tp_size(), dtype=param.dtype))
            _mark(sliced, SLICED)
            setattr(module, name, sliced)


def apply_tensor_parallel(model: nn.Module, vocab_padding_multiple: int,
                          sequence_parallel: bool = False) -> None:
    """Swap a model's modules in place for TP modules of the current TP group, every parameter
    as the TP plan (tp_plan.py) says; a parameter it does not cover is an error before anything
    changes. The TP modules are shard-shaped meta-device modules: materialize.py fills them, here
    at once from a full model's own weights, later (parallelize) for a meta-device skeleton.
    sequence_parallel: also split the regions outside the TP GEMMs along the sequence
    (sequence_parallel.py)."""
    for name, _ in model.named_parameters():
        tp_kind(name)
    param = next(model.parameters())
    full = None if is_meta(model) else own_weights(model)
    config = _megatron_config(state.tp_size(), param.dtype)
    with torch.device("meta"):
        for name, module in list(model.named_modules()):  # a list: children change on the way
            _shard_children(module, f"{name}." if name else "", config, sequence_parallel)
        _replicate_head_norms(model)
        assert tp_kind("embed.word.weight") == tp_kind("lm_head.weight") == VOCAB
        padded = padded_vocab_size(model.config.vocab_size, vocab_padding_multiple,
                                   state.tp_size())
        model.embed.word = vocab_embedding_from(model.embed.word, padded, config)
        model.lm_head = vocab_head_from(model.lm_head, padded, config,
                                        tied_to=model.embed.word if model.config.tie_embeddings
                                        else None, sequence_parallel=sequence_parallel)
        if sequence_parallel:
            apply_sequence_parallel_regions(model)
    if full is not None:
        materialize(model, "", full, param.device)
