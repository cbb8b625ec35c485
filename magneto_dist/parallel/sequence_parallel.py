"""Sequence parallelism (parallel.sequence_parallel, Megatron's name): under TP, the regions
outside the tensor-parallel GEMMs hold 1/TP of the sequence on each rank.

Under plain TP every rank of the group holds the whole activation [b, s, d] wherever the model
is not split by heads or FFN units: the embeddings' output, every outer norm (pre/post/output/
final), the residual adds and their dropout, BERT's MLM transform. Each TP rank computes the
same thing there and keeps the same activations for backward. Sequence parallelism splits those
regions along the sequence, [b, s/tp, d] per rank, and changes the collectives at their borders:

    SP region [b, s/tp, d] --all-gather--> TP region [b, s, d/tp heads] --reduce-scatter--> SP

The all-gather's backward is a reduce-scatter, which replaces the column-parallel input-gradient
all-reduce; the reduce-scatter replaces the row-parallel output all-reduce (an all-reduce is a
reduce-scatter plus an all-gather, so the bytes moved are the same) and its backward is an
all-gather. The Sub-LN inner norms are inside the TP region and stay TP-sharded
(tensor_parallel.py); the LM head gathers its input and gives vocab-parallel logits as under TP.

The collectives are written here because megatron-core's (tensor_parallel/mappings.py,
_gather_along_first_dim / _reduce_scatter_along_first_dim, and ColumnParallelLinear's gather
into get_global_memory_buffer) split dim 0 of its [s, b, h] layout and allocate on
torch.cuda.current_device(): they run neither on CPU nor on this batch-first [b, s, d] model.
Here they are torch.distributed's all_gather_single / reduce_scatter_single (torch 2.13's
names for all_gather_into_tensor / reduce_scatter_tensor), which gloo and NCCL both run, over
dim 0 of a [tp, b, s/tp, ...] view, so a rank's part of the sequence is one contiguous block.
Under context parallelism the sequence split is of what the CP rank holds (its head and tail
chunks, concatenated): position ids and document ids stay whole, since attention sees the
gathered sequence.

Where the gather happens follows torchtitan (PrepareModuleInput on the attention and FFN
modules), not megatron-core: once per sublayer, at the entry of its TP region
(gather_sublayer_input), shared by Q/K/V (or W_1 and the SwiGLU gate), and autograd keeps the
gathered [b, s, d] for the weight gradients. Megatron's column-parallel layer instead keeps its
[s/tp, b, h] input and gathers it again in backward; with this model's separate Q, K and V
projections that would be three gathers forward and three more in backward where this is one,
for a saving of one [b, s, d] tensor per sublayer.

Gradients of the SP-region parameters (outer norms, the row-parallel biases, the MLM transform)
are partial on each TP rank: each saw only its part of the sequence. Megatron sums them over
the TP group in a finalize step after backward (finalize_model_grads); DeepSpeed's ZeRO-1/2/3
and its pipeline consume gradients in hooks as backward produces them, so a sum after backward
would come too late. Here each such module passes its parameters through
reduce_grads_over_tp where it uses them: an identity forward whose backward all-reduces the
module's gradients (one flat all-reduce for a norm's weight and bias) before they accumulate.
Summed, they are identical on every TP rank, as replicated (unmarked) parameters must be for
DeepSpeed's grad norm, which counts such a parameter once per TP group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..model.layers import ResidualSublayer
from ..model.norms import LayerNorm, RMSNorm
from . import state
from .tp_plan import REPLICATED, tp_kind

SEQUENCE_DIM = 1  # the model is batch-first: [b, s, d]


def _check_divisible(length: int) -> None:
    if length % state.tp_size():
        raise ValueError(f"sequence parallelism splits the sequence across the "
                         f"{state.tp_size()} tensor-parallel ranks, but this input has "
                         f"{length} positions; give it a multiple of {state.tp_size()}")


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    """[b, s/tp, ...] of every TP rank -> [b, s, ...], rank r's part at positions r*s/tp.."""
    tp, x = state.tp_size(), x.contiguous()
    # concatenated along dim 0 (gloo takes no stacked output): [tp * b, s/tp, ...]
    parts = x.new_empty((tp * x.shape[0], *x.shape[1:]))
    dist.all_gather_single(parts, x, group=state.tp_group())
    parts = parts.unflatten(0, (tp, -1))                                 # [tp, b, s/tp, ...]
    return parts.movedim(0, SEQUENCE_DIM).flatten(SEQUENCE_DIM, SEQUENCE_DIM + 1)


def _reduce_scatter(x: torch.Tensor) -> torch.Tensor:
    """[b, s, ...] partial sums on every TP rank -> this rank's [b, s/tp, ...] of their sum."""
    _check_divisible(x.shape[SEQUENCE_DIM])
    parts = x.unflatten(SEQUENCE_DIM, (state.tp_size(), -1)).movedim(SEQUENCE_DIM, 0)
    parts = parts.contiguous()                                           # [tp, b, s/tp, ...]
    local = parts.new_empty(parts.shape[1:])
    dist.reduce_scatter_single(local, parts.flatten(0, 1), group=state.tp_group())
    return local


def _split(x: torch.Tensor) -> torch.Tensor:
    """This rank's part of the sequence, in memory of its own (the whole input is freed)."""
    _check_divisible(x.shape[SEQUENCE_DIM])
    local = x.shape[SEQUENCE_DIM] // state.tp_size()
    return x.narrow(SEQUENCE_DIM, state.tp_rank() * local, local).clone(
        memory_format=torch.contiguous_format)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_gather(x)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad)


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad)


class _SplitSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad)


def gather_sequence(x: torch.Tensor) -> torch.Tensor:
    """SP -> TP region: [b, s/tp, d] -> [b, s, d]; backward reduce-scatters."""
    return _GatherSequence.apply(x)


def reduce_scatter_sequence(x: torch.Tensor) -> torch.Tensor:
    """TP -> SP region: partial [b, s, d] -> summed [b, s/tp, d]; backward all-gathers."""
    return _ReduceScatterSequence.apply(x)


def split_sequence(x: torch.Tensor) -> torch.Tensor:
    """Replicated -> SP region: [b, s, d] -> this rank's [b, s/tp, d]; backward all-gathers."""
    return _SplitSequence.apply(x)


class _ReduceGradsOverTP(torch.autograd.Function):
    """Identity forward; backward sums the gradients over the TP group, all of them in one
    all-reduce."""

    @staticmethod
    def forward(ctx, *tensors):
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=state.tp_group())
        return tuple(part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]),
                                                         grads))


def reduce_grads_over_tp(*params: torch.Tensor) -> tuple:
    """`params` as a module of the SP region uses them: their gradients come out summed over
    the TP group (see the module's notes)."""
    return _ReduceGradsOverTP.apply(*params)


def mark_sequence_parallel(module: nn.Module) -> None:
    """Mark a module's own parameters as used in the SP region (Megatron's mark), or, for the
    QK-norms inside the TP region, as shared by heads that ranks hold in parts: either way
    their gradients are summed over TP where the module uses them."""
    for param in module.parameters(recurse=False):
        param.sequence_parallel = True


class SequenceParallelLayerNorm(LayerNorm):
    """An outer LayerNorm over this rank's part of the sequence. Its gain and bias enter the
    gradient sum in fp32 (the norm computes in fp32 anyway), so a bf16 gradient is rounded once,
    after the sum, as a single rank's is."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mark_sequence_parallel(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = reduce_grads_over_tp(self.weight.float(), self.bias.float())
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias,
                            self.eps).type_as(x)


class SequenceParallelRMSNorm(RMSNorm):
    """An outer RMSNorm over this rank's part of the sequence."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mark_sequence_parallel(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (weight,) = reduce_grads_over_tp(self.weight.float())
        return F.rms_norm(x.float(), self.normalized_shape, weight, self.eps).type_as(x)


class SequenceParallelLinear(nn.Linear):
    """A replicated linear layer in the SP region (BERT's MLM dense)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mark_sequence_parallel(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = [p for p in (self.weight, self.bias) if p is not None]
        return F.linear(x, *reduce_grads_over_tp(*params))


def sequence_parallel_form(module: nn.Module) -> nn.Module:
    """The SP-region module (unfilled, on the current device) for a replicated norm or linear
    layer of the model."""
    if isinstance(module, nn.Linear):
        return SequenceParallelLinear(module.in_features, module.out_features,
                                      bias=module.bias is not None)
    cls = SequenceParallelRMSNorm if isinstance(module, RMSNorm) else SequenceParallelLayerNorm
    return cls(module.normalized_shape[0], eps=module.eps)


class SplitSequence(nn.Module):
    """The embeddings' output into the layers: [b, s, d] -> this rank's [b, s/tp, d]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_sequence(x)


def gather_sublayer_input(sublayer: nn.Module) -> None:
    """A sublayer's TP region (its transform: the column-parallel projections through the
    row-parallel one) takes the whole sequence: its input, and a cross-attention's memory,
    gathered once for all its projections. Binds a wrapped transform on the instance, as
    activation recompute binds forward, so nothing in the model changes."""
    transform = sublayer.transform

    def run(h: torch.Tensor, **kwargs) -> torch.Tensor:
        if kwargs.get("memory") is not None:
            kwargs["memory"] = gather_sequence(kwargs["memory"])
        return transform(gather_sequence(h), **kwargs)
    sublayer.transform = run


def apply_sequence_parallel_regions(model: nn.Module) -> None:
    """After the TP swaps: the embeddings' output split along the sequence, every sublayer's
    TP region entered through a gather. A replicated parameter past the split whose gradient
    would not be summed over TP is an error: learned positions (added before the split) are
    the only replicated parameters that see the whole sequence."""
    model.embed.to_layers = SplitSequence()
    for module in model.modules():
        if isinstance(module, ResidualSublayer):
            gather_sublayer_input(module)
    partial = [name for name, param in model.named_parameters()
               if tp_kind(name) == REPLICATED and not name.startswith("embed.")
               and not getattr(param, "sequence_parallel", False)]
    if partial:
        raise ValueError(f"sequence parallelism: {partial} are used in the SP region but their "
                         "gradients are not summed over TP (sequence_parallel.py)")
