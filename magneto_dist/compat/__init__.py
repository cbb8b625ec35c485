"""The one door to the private internals of the libraries this project builds on.

DeepSpeed, megatron-core and torch.distributed.elastic each lack something this project needs
(a parameter-count hook, a universal-checkpoint format that crosses ZeRO stages, an agent that
records failures, ...), and the only way in is through names they do not promise to keep. Every
such touch lives in this package, one module per library, and each module checks at import that
what it touches is still there, in the shape it was written for: an upgrade that renames a
private method fails loudly at start-up, naming the versions, instead of silently (a renamed
PipelineModule._count_layer_params would make every rank build every pipeline stage).

This package imports only the libraries and the bottom of the project (errors), so every layer
may use it.
"""
from __future__ import annotations

import importlib.metadata
import inspect
from typing import Callable, Iterable, Optional

# The versions each module here was written and tested against (requirements.txt pins them).
WRITTEN_FOR = {"deepspeed": "0.19.8", "megatron-core": "0.16.1", "torch": "2.13.0"}


class CompatError(RuntimeError):
    """A library no longer has an internal this project relies on."""


def installed(library: str) -> str:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def incompatible(library: str, what: str, problem: str) -> CompatError:
    return CompatError(
        f"magneto_dist relies on {library}'s {what}, which {problem} in the installed "
        f"{library} {installed(library)}; it was written for {library} "
        f"{WRITTEN_FOR[library]}. Install the versions pinned in requirements.txt, or update "
        f"magneto_dist/compat/ for this version")


def require_attribute(library: str, owner, name: str, what: Optional[str] = None) -> None:
    """`owner.name` must exist."""
    if not hasattr(owner, name):
        label = what or f"{getattr(owner, '__qualname__', getattr(owner, '__name__', owner))}.{name}"
        raise incompatible(library, label, "is gone")


def require_parameters(library: str, function: Callable, names: Iterable[str],
                       what: str) -> None:
    """`function` must still take these parameters (by name, in this order)."""
    try:
        have = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        raise incompatible(library, what, "has no readable signature") from None
    want = list(names)
    if have[:len(want)] != want:
        raise incompatible(library, what, f"takes ({', '.join(have)}) instead of "
                                          f"({', '.join(want)})")


def require_source(library: str, function: Callable, fragment: str, what: str) -> None:
    """`function`'s source must still contain `fragment` (how it uses what we provide)."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        raise incompatible(library, what, "has no readable source") from None
    if fragment not in source:
        raise incompatible(library, what, f"no longer reads `{fragment}`")
