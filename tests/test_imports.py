"""Data flows one way. The layers, bottom first (a module may import only from lower layers, or
from its own package):

    errors, files, launch_env, plotting       facts and helpers every layer reads
    dims, compat, model.config                the layout; the one door to library internals;
                                              the model's config (a leaf module)
    config, resilience                        the run config; fault points and rank watchdogs
    data, model                               tokenizers, corpora, datasets; the model
    parallel                                  process groups, TP, pipeline, shard-only start-up
    checkpoint                                save, resume, universal form, export
    training                                  engine, loop, metrics; run.py wires it all
    launcher, stability                       the fault-tolerant launcher; stability sweeps
    report                                    a run's report page (reads what all the above wrote)

This reads every module's imports (without running them) and checks each against that order."""
import ast
import importlib
import importlib.util
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "magneto_dist"
LAYERS = [
    ["errors", "files", "launch_env", "plotting"],
    ["dims", "compat", "model.config"],
    ["config", "resilience"],
    ["data", "model"],
    ["parallel"],
    ["checkpoint"],
    ["training"],
    ["launcher", "stability"],
    ["report"],
]
LAYER_OF = {unit: depth for depth, units in enumerate(LAYERS) for unit in units}


def unit_of(parts) -> str:
    """The layer unit a module path (relative to magneto_dist, without .py) belongs to:
    model/config.py is a unit of its own, below the rest of the model package."""
    if list(parts[:2]) == ["model", "config"]:
        return "model.config"
    return parts[0]


def imported_units(source: str, location: pathlib.PurePath) -> set:
    """The layer units a module imports (relative or absolute, at any depth of the code);
    `location` is the module's path relative to magneto_dist."""
    here = list(location.with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module
                                 else [node.names[0].name])
            elif node.module and node.module.startswith("magneto_dist."):
                target = node.module.split(".")[1:]
            else:
                continue
            found.add(unit_of(target))
        elif isinstance(node, ast.Import):
            found |= {unit_of(a.name.split(".")[1:]) for a in node.names
                      if a.name.startswith("magneto_dist.")}
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_unit_has_a_layer():
    units = {unit_of(p.relative_to(PACKAGE).with_suffix("").parts) for p in MODULES}
    assert units - {"__init__"} <= set(LAYER_OF), sorted(units - set(LAYER_OF))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_import_only_lower_layers(path):
    me = unit_of(path.relative_to(PACKAGE).with_suffix("").parts)
    if me == "__init__":
        return
    package = path.relative_to(PACKAGE).parts[0]
    bad = sorted(unit for unit in imported_units(path.read_text(), path.relative_to(PACKAGE))
                 if unit.split(".")[0] != package and LAYER_OF[unit] >= LAYER_OF[me])
    assert not bad, f"{me} (layer {LAYER_OF[me]}) imports {bad}"


def test_the_reader_sees_imports_inside_functions_too():
    source = ("def f():\n    from ..training.engine import build_engine\n"
              "    from ..model.config import ModelConfig\n    from . import x\n")
    assert imported_units(source, pathlib.PurePath("data/m.py")) == {"training", "model.config",
                                                                    "data"}


def test_no_script_edits_sys_path():
    """The package is installed (pyproject.toml, `make`), so scripts and tests import it as is."""
    root = PACKAGE.parent
    scripts = [p for folder in ("launch", "tools", "tests") for p in (root / folder).rglob("*.py")]
    assert len(scripts) > 20
    edits = ("sys.path." + "insert", "sys.path." + "append")  # split: this file is scanned too
    offenders = [str(p.relative_to(root)) for p in scripts
                 if any(edit in p.read_text() for edit in edits)]
    assert not offenders


def test_every_name_scripts_import_from_the_package_exists():
    """launch/ and tools/ run only when someone runs them (several only on a GPU or a cluster),
    so a name moved inside the package would fail there first: every `from magneto_dist...
    import NAME` in them, at the top or inside a function, must name something that exists."""
    root = PACKAGE.parent
    scripts = [p for folder in ("launch", "tools") for p in (root / folder).rglob("*.py")]
    missing = []
    for path in scripts:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 \
                    and (node.module or "").split(".")[0] == "magneto_dist":
                module = importlib.import_module(node.module)
                missing += [f"{path.relative_to(root)}:{node.lineno}: {node.module}.{a.name}"
                            for a in node.names if not hasattr(module, a.name)
                            and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert len(scripts) > 15 and not missing, missing


def imported_modules(source: str, location: pathlib.PurePath) -> set:
    """The package's modules a module imports ("data.tokenizer"; a package is its __init__),
    at any depth of the code; `location` is its path relative to magneto_dist."""
    here = list(location.with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)] + (node.module.split(".")
                                                             if node.module else [])
            elif (node.module or "").startswith("magneto_dist."):
                base = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from . import x` imports the module x
                submodule = base + [alias.name]
                found.add(".".join(submodule if module_path(submodule) else base))
        elif isinstance(node, ast.Import):
            found |= {".".join(a.name.split(".")[1:]) for a in node.names
                      if a.name.startswith("magneto_dist.")}
    return {name for name in found if name}


def module_path(parts) -> pathlib.Path:
    """The file of a module of the package, or None."""
    for path in (PACKAGE.joinpath(*parts).with_suffix(".py"),
                 PACKAGE.joinpath(*parts, "__init__.py")):
        if parts and path.is_file():
            return path
    return None


def test_no_two_modules_import_each_other():
    """Within a layer, too, imports run one way: no module reaches itself through the modules
    it imports (data/tokenizer.py and data/tokenizer_types.py once did, with a deferred
    import inside build_tokenizer)."""
    graph = {}
    for path in MODULES:
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = imported_modules(path.read_text(), path.relative_to(PACKAGE)) - {name}
    cycles = []
    for start in graph:  # a depth-first walk from each module back to itself
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    cycles.append(" -> ".join(trail + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
    assert not cycles, cycles
