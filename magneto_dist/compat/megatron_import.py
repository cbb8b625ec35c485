"""megatron-core imported without compiling at import time.

megatron-core decorates its fused kernels (bias-GeLU, SwiGLU, bias-dropout-add, the MoE
router's, ...) with `jit_fuser`, which megatron/core/jit.py binds to `torch.compile` when its
package is first imported. Each decoration calls `torch.compile(fn)` there and then, which
imports torch's dynamo and inductor and builds 27 wrappers: 1.5 s of CPU of every process's
6.6 s import on this project's CPUs (`/usr/bin/time python -c "import
magneto_dist.training.run"` with and without it), for kernels this project never calls (its layers are its own; from megatron it takes the tensor-parallel linears, the
vocab-parallel cross entropy, the process groups and the datasets). megatron offers no switch
that acts before its own import (`disable_jit_fuser` lives in the package it would have to
import first), so `import_megatron_core` binds `jit_fuser`, for the length of the import, to a
`torch.compile` that compiles on the first call instead: a kernel that is called runs compiled
exactly as before, one that is not costs nothing.
"""
from __future__ import annotations

import functools
import sys

import torch


def _compile_on_first_call(compile_now):
    """A torch.compile that defers `compile_now(fn, **options)` to fn's first call."""
    def deferred(model=None, **options):
        if model is None:  # used as @torch.compile(**options)
            return lambda fn: deferred(fn, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = compile_now(model, **options)
            return compiled(*args, **kwargs)
        return call
    return deferred


def import_megatron_core() -> None:
    """Import megatron.core (once per process) with its jit_fuser compiling on first call."""
    if "megatron.core" in sys.modules:
        return
    compile_now = torch.compile
    torch.compile = _compile_on_first_call(compile_now)
    try:
        import megatron.core.jit  # noqa: F401  (binds jit_fuser while torch.compile defers)
    finally:
        torch.compile = compile_now
