"""Random streams for tensor parallelism, and activation recompute that replays them.

Dropout in the replicated region (embeddings, residual branches after the row-parallel
all-reduce) must draw the same mask on every TP rank, or the replicated stream diverges; dropout
inside the TP region (attention probabilities of the local heads) must draw different masks per
TP rank. So the default generator is seeded alike on all TP ranks and a second stream, seeded
seed + 2718 + tp_rank as in Megatron, is swapped in around attention. Under sequence
parallelism the embeddings' and residual dropouts act on each rank's own part of the sequence,
so they draw from that per-rank stream too (Megatron forks its tracker there as well).
megatron-core's tracker (get_cuda_rng_tracker) only works on CUDA, hence this one, which uses the CPU generator on CPU
and the current CUDA device's generator on GPU.
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.utils.checkpoint
from torch import nn

TP_SEED_OFFSET = 2718
PP_SEED_OFFSET = 100  # per pipeline stage, as Megatron-LM's _set_random_seed


def stage_seed(seed: int, pp_rank: int) -> int:
    """The seed of a pipeline stage's streams. Each stage runs other layers, so its dropout
    must not draw the same masks as the stage before it (with one seed everywhere, layer k of
    stage 1 repeated layer k of stage 0's masks); within a stage every TP rank shares it."""
    return seed + PP_SEED_OFFSET * pp_rank


def seed_streams(seed: int, tp_rank: int, pp_rank: int) -> "TensorParallelRNG":
    """Seed this rank's default stream (the replicated dropout) from its stage, and return its
    TP stream (attention dropout on the local heads)."""
    torch.manual_seed(stage_seed(seed, pp_rank))
    return TensorParallelRNG(stage_seed(seed, pp_rank), tp_rank)


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def _get_state():
    return torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.get_rng_state()


def _set_state(state) -> None:
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class TensorParallelRNG:
    """The per-TP-rank stream: `with rng.fork(): ...` draws from it instead of the default."""

    def __init__(self, seed: int, tp_rank: int):
        with torch.random.fork_rng(devices=[_device()] if _device() else []):
            torch.manual_seed(seed + TP_SEED_OFFSET + tp_rank)
            self.state = _get_state()

    @contextlib.contextmanager
    def fork(self):
        outside = _get_state()
        _set_state(self.state)
        try:
            yield
        finally:
            self.state = _get_state()
            _set_state(outside)


def checkpointed(forward, rng: TensorParallelRNG = None):
    """forward recomputed in backward, with the default and the TP stream both replayed.

    torch.utils.checkpoint restores the default generator for the recompute itself
    (preserve_rng_state); the TP stream is saved at forward time and set back around the
    recompute through context_fn, then left where the forward pass had left it.
    """
    def run(*args, **kwargs):
        if rng is None:  # torch.compile traces this form (a custom context_fn it cannot)
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False,
                                                     preserve_rng_state=True, **kwargs)
        saved = {}

        @contextlib.contextmanager
        def at_forward():
            saved["state"] = rng.state
            yield

        @contextlib.contextmanager
        def at_recompute():
            after_forward = rng.state
            rng.state = saved["state"]
            try:
                yield
            finally:
                rng.state = after_forward

        return torch.utils.checkpoint.checkpoint(
            forward, *args, use_reentrant=False, preserve_rng_state=True,
            context_fn=lambda: (at_forward(), at_recompute()), **kwargs)
    return run


def apply_activation_checkpointing(layers, rng: TensorParallelRNG = None) -> None:
    """Recompute each layer in backward. Binds a wrapped forward on the instance, so parameter
    names (and therefore checkpoints) do not change."""
    for layer in layers:
        layer.forward = checkpointed(types.MethodType(type(layer).forward, layer), rng)


class StreamDropout(nn.Dropout):
    """nn.Dropout drawing its mask from `rng` (a TensorParallelRNG)."""

    def __init__(self, p: float, rng: TensorParallelRNG):
        super().__init__(p)
        self.rng = rng

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.rng.fork():
            return super().forward(x)


def use_tensor_parallel_rng(model: nn.Module, rng: TensorParallelRNG,
                            sequence_parallel: bool = False) -> None:
    """Attention dropout (on the local heads) draws from the TP stream; under sequence
    parallelism every dropout module (embeddings, residual branches: all in the SP region) does
    too."""
    from ..model.layers import Attention
    for module in list(model.modules()):  # a list: children change on the way
        if isinstance(module, Attention):
            module.dropout_rng = rng.fork
        if not sequence_parallel:
            continue
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, name, StreamDropout(child.p, rng))
