"""torch 2.13's per-module parameter table, which shard-only materialization rewrites.

parallel/materialize.py swaps each meta-device parameter of a module for its real shard where
it stands: it reads the module's own table (`nn.Module._parameters`, None entries included:
a slot such as bias=False) and writes the new parameter into it under the same name, which is
what `register_parameter` does last after its checks and registration hooks. The swap is no
new registration (same name, same place, a tied parameter stays one object in both of its
modules), so it writes the table itself. That the table is where torch registers and reads a
module's parameters is checked here.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from torch import nn

from . import require_source

LIBRARY = "torch"


def own_parameters(module: nn.Module) -> List[Tuple[str, Optional[nn.Parameter]]]:
    """(name, parameter or None) of each parameter slot of `module` itself, not its children."""
    return list(module._parameters.items())


def replace_own_parameter(module: nn.Module, name: str, param: nn.Parameter) -> None:
    """Put `param` in `module`'s slot `name` (one of own_parameters')."""
    module._parameters[name] = param


def check() -> None:
    """What this module relies on is still there (run at import)."""
    require_source(LIBRARY, nn.Module.register_parameter, "self._parameters[name] = param",
                   "nn.Module.register_parameter's parameter table (Module._parameters)")
    require_source(LIBRARY, nn.Module.named_parameters, "module._parameters.items()",
                   "nn.Module.named_parameters' parameter table (Module._parameters)")


check()
