"""torch 2.13's compiler settings and counters that train.compile=blocks relies on.

- `torch._dynamo.config.ignore_logging_functions`: megatron-core's RowParallelLinear.forward
  calls warnings.warn on global rank 0 only (utils.get_tensor_model_parallel_group_if_none:
  "tp_group is None"), which dynamo cannot trace. That was a graph break on rank 0 alone: with
  fullgraph, rank 0 raised while the other ranks waited in the block's all-reduce forever.
  `ignore_warnings_in_compiled_code` makes warnings.warn a no-op inside compiled code only.
- `torch._inductor.config.fallback_random`: inductor draws dropout masks from its own
  generator, so a compiled block's masks differ from eager's (losses 3e-2 apart after a few
  steps with dropout 0.1); `eager_random_in_compiled_code` makes compiled code draw from
  torch's generator as eager does (5e-7 apart).
- `torch._dynamo.config.recompile_limit` (8) and `accumulated_recompile_limit` (256): how many
  compiled versions of one function dynamo keeps. Identical blocks share one graph, but
  LayerNorm Scaling's blocks differ by their constant 1/sqrt(layer) and each needs its own:
  with fullgraph, a 12-layer LNS model raised FailOnRecompileLimitHit at the first step.
  `allow_graphs_per_function` raises both limits to what the model's blocks need.
- `torch._dynamo.utils.calculate_time_spent`: the seconds this process spent compiling
  (dynamo's frame compiles plus the backward graphs' compiles), for the start-up line.
"""
from __future__ import annotations

import warnings

import torch._dynamo
import torch._dynamo.utils
import torch._inductor.config

from . import require_attribute, require_source

LIBRARY = "torch"


def ignore_warnings_in_compiled_code() -> None:
    torch._dynamo.config.ignore_logging_functions.add(warnings.warn)


def eager_random_in_compiled_code() -> None:
    torch._inductor.config.fallback_random = True


def allow_graphs_per_function(graphs: int) -> None:
    """Let dynamo keep at least `graphs` compiled versions of one function."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, graphs)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, graphs)


def compile_seconds() -> float:
    """Seconds spent compiling so far in this process (0.0 before any compile)."""
    return torch._dynamo.utils.calculate_time_spent().get("total_wall_time", 0.0)


def check() -> None:
    """What this module relies on is still there (run at import)."""
    require_attribute(LIBRARY, torch._dynamo.config, "ignore_logging_functions",
                      "torch._dynamo.config.ignore_logging_functions")
    for limit in ("recompile_limit", "accumulated_recompile_limit"):
        require_attribute(LIBRARY, torch._dynamo.config, limit, f"torch._dynamo.config.{limit}")
    require_attribute(LIBRARY, torch._inductor.config, "fallback_random",
                      "torch._inductor.config.fallback_random")
    for fragment in ("total_wall_time", "entire_frame_compile", "entire_backward_compile"):
        require_source(LIBRARY, torch._dynamo.utils.calculate_time_spent, fragment,
                       "dynamo's compile-time accounting (torch._dynamo.utils."
                       "calculate_time_spent)")


check()
