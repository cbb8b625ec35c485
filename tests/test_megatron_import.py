"""megatron-core is imported with its import-time torch.compile calls deferred to first use."""
import subprocess
import sys

import torch

from magneto_dist.compat.megatron_import import _compile_on_first_call


def test_a_deferred_compile_compiles_once_on_the_first_call_with_its_options():
    compiled = []

    def compile_now(fn, **options):
        compiled.append(options)
        return lambda x: fn(x) + 100  # tells the compiled function from the original

    deferred = _compile_on_first_call(compile_now)

    @deferred
    def plain(x):
        return x * 2

    @deferred(dynamic=True)
    def with_options(x):
        return x + 1

    assert compiled == [] and plain.__name__ == "plain"  # nothing compiled at decoration
    assert plain(3) == 106 and plain(4) == 108 and compiled == [{}]  # once, then reused
    assert with_options(1) == 102 and compiled == [{}, {"dynamic": True}]


def test_importing_the_package_leaves_megatron_kernels_uncompiled_and_torch_compile_whole():
    """A fresh process: the whole training stack imported, torch's dynamo is not (it costs
    ~1.5 s of CPU a process, for kernels never called), megatron's jit_fuser defers, and
    torch.compile is torch's own again."""
    probe = ("import sys, torch, magneto_dist.training.run, megatron.core.jit as jit; "
             "print('torch._dynamo' in sys.modules, jit.jit_fuser is torch.compile, "
             "jit.jit_fuser.__qualname__)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.splitlines()[-1].split()
    assert out == ["False", "False", "_compile_on_first_call.<locals>.deferred"], out
    assert torch.compile.__module__ == "torch"


def test_a_megatron_kernel_still_computes_compiled_on_first_call():
    from megatron.core.fusions.fused_bias_gelu import bias_gelu
    x, bias = torch.randn(8), torch.randn(8)
    expected = x + bias
    expected = expected * 0.5 * (1.0 + torch.tanh(0.79788456 * expected *
                                                    (1 + 0.044715 * expected * expected)))
    assert torch.allclose(bias_gelu(bias, x), expected, atol=1e-6)
