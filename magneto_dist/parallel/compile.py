"""Compiled blocks (train.compile=blocks): torch.compile on each transformer block, torchtitan's
way. A block's forward is compiled in place (nn.Module.compile, so parameter names and
checkpoints do not change), after tensor parallelism and activation recompute are applied and
before pipeline stages are cut; compiling happens at the block's first call (the first step).
Identical blocks share one compiled graph (dynamo guards on the code and on what it reads, not
on the module), so a model compiles its block once, not once per layer, and once more for
each other mode it runs in (validation: eval mode without autograd; logging.diagnostics: eval
mode with autograd). LayerNorm Scaling is the exception: its blocks differ by the constant
1/sqrt(layer), so each compiles its own graph (compile time grows with depth), and dynamo is
told to keep that many (compat.dynamo.allow_graphs_per_function; its default of 8 versions of
one function ended a 12-layer LNS run at its first step).

fullgraph: a block that cannot be traced whole is an error at the first step, never a block
silently cut into slow pieces. What each layout needed, found by compiling it:
- TP: megatron-core's column-parallel linear all-reduces its input gradient with
  `async_op=True` inside its autograd function, which dynamo cannot trace; those layers do the
  same all-reduce synchronously (compat.megatron.synchronous_input_grad_all_reduce). The TP
  Sub-LN's all-reduces (tensor_parallel._SumOverTP) and megatron's row-parallel reduction
  trace as functional collectives. megatron-core warns on rank 0 only inside the row-parallel
  forward; warnings are ignored in compiled code (compat.dynamo), or rank 0 alone broke the
  graph and the other ranks waited for it forever. Its once-per-process TP warning flag is set
  before compiling (compat.megatron.mark_tp_linear_warning_given), or the LM head's first call
  flipped it and every block compiled twice.
- Sequence parallelism: its all-gather, reduce-scatter and gradient all-reduce
  (sequence_parallel.py) are plain dist.* calls inside autograd functions, which dynamo
  remaps to functional collectives, so SP blocks compile whole (the TP stream's dropout
  aside, as below).
- Activation recompute traces as torch.utils.checkpoint without a custom context
  (parallel/random.py checkpointed).
- Dropout: compiled code draws from torch's generator as eager does (compat.dynamo
  eager_random_in_compiled_code), so the masks, the losses and a resume are eager's.
Compile cache: left where torch keeps it (TORCHINDUCTOR_CACHE_DIR, by default
/tmp/torchinductor_$USER, one per machine and user), not set per run directory. Its entries are
keyed by the graph, the torch version and the compiler settings, not by the run, and written
atomically, so every run of the same model shape and layout shares them: a restart under the
fault-tolerant launcher, a rerun, the next run of a sweep. A per-run cache would compile each
new run cold. Measured on the default model (1 rank): compiling took 33-40 s at the first
start-up and 3-5 s at a resume on the same machine; under TP 34 s and 11 s, since torch's
AOTAutograd cache does not store graphs with custom autograd functions (megatron's TP mappings,
the TP Sub-LN's all-reduce) and only inductor's kernels are reused. A cluster whose /tmp does
not outlive a job can point TORCHINDUCTOR_CACHE_DIR at lasting node-local storage.
Run eager instead, with the reason at start-up (eager_reason):
- ZeRO-3: DeepSpeed gathers each submodule's parameters in forward hooks it marks
  torch.compiler.disable, so no block traces whole;
- dropout under TP: attention dropout draws from the per-rank stream by swapping the
  generator state (random.TensorParallelRNG.fork), which dynamo refuses to trace;
- context parallelism: the ring attention exchanges blocks point to point inside its own
  autograd function (context_parallel.py), which a whole-graph trace cannot hold;
- document masking: the mask is built once per forward pass and shared by every block
  (model/attention.py Documents, a caching Python object), not a tensor a graph takes.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..config import Config
from ..dims import ParallelDims


def transformer_blocks(model: nn.Module) -> list:
    stacks = [s for s in (getattr(model, "encoder", None), getattr(model, "decoder", None)) if s]
    return [layer for stack in stacks for layer in stack.layers]


def eager_reason(cfg: Config, dims: ParallelDims) -> Optional[str]:
    """Why this layout's blocks run eager under train.compile=blocks, or None."""
    if dims.zero_stage == 3:
        return ("ZeRO-3 gathers each submodule's parameters in forward hooks that DeepSpeed "
                "keeps out of torch.compile, so no block compiles whole")
    if dims.tp > 1 and cfg.model.dropout > 0:
        return ("attention dropout under tensor parallelism swaps in the per-rank RNG stream "
                "(torch.get_rng_state/set_rng_state), which torch.compile cannot trace")
    if dims.cp > 1:
        return ("context parallelism's ring attention sends and receives blocks inside its "
                "autograd function, which a whole-graph trace cannot hold")
    if cfg.data.reset_attention_mask:
        return ("document masking shares one mask object, built per forward pass, between "
                "the blocks; it is not a tensor a compiled graph takes")
    return None


def compile_blocks(model: nn.Module, cfg: Config, dims: ParallelDims,
                   backend: str = "inductor") -> str:
    """Mark every transformer block of `model` for compiling, or leave them eager where the
    layout cannot compile; -> what was done, for the start-up log. `backend` is torch.compile's
    (tests trace with a cheaper one than inductor)."""
    reason = eager_reason(cfg, dims)
    if reason:
        return f"train.compile=blocks: the blocks run eager: {reason}"
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from ..compat.dynamo import (allow_graphs_per_function, eager_random_in_compiled_code,
                                 ignore_warnings_in_compiled_code)
    from ..compat.megatron import mark_tp_linear_warning_given, synchronous_input_grad_all_reduce

    ignore_warnings_in_compiled_code()
    mark_tp_linear_warning_given()
    if cfg.model.dropout > 0:
        eager_random_in_compiled_code()  # the same dropout masks as eager
    blocks = transformer_blocks(model)
    allow_graphs_per_function(3 * len(blocks))  # at most one per block and mode (see above)
    for block in blocks:
        for module in block.modules():
            if isinstance(module, ColumnParallelLinear):
                synchronous_input_grad_all_reduce(module)
        block.compile(backend=backend, fullgraph=True, dynamic=False)
    return (f"train.compile=blocks: {len(blocks)} transformer blocks compile at the first "
            "step (torch.compile, fullgraph)")
