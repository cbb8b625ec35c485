"""Data flows one way: data -> model -> parallel -> training -> checkpoint, with the wiring
(training/run.py, the launcher, the sweep) above them. A lower package never imports a higher
one; this reads every module's imports (without running them) and checks the rules that hold."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "magneto_dist"
HIGHER = ["parallel", "training", "checkpoint", "launcher", "stability"]
FORBIDDEN = {
    "data": ["model"] + HIGHER,
    "model": ["data"] + HIGHER,
    "parallel": HIGHER[1:],
}


def imported_packages(path: pathlib.Path) -> set:
    """The magneto_dist subpackages a module imports (relative or absolute)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 2 and node.module:          # from ..X import ...
                found.add(node.module.split(".")[0])
            elif node.level == 0 and node.module and node.module.startswith("magneto_dist."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names
                      if a.name.startswith("magneto_dist.")}
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_packages_do_not_import_higher_ones(package):
    modules = sorted((PACKAGE / package).glob("*.py"))
    assert modules
    offenders = {str(m.relative_to(PACKAGE)): sorted(imported_packages(m) & set(FORBIDDEN[package]))
                 for m in modules}
    assert not {m: bad for m, bad in offenders.items() if bad}


def test_the_reader_sees_imports_inside_functions_too(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from ..training.engine import build_engine\n")
    assert imported_packages(module) == {"training"}


def test_no_script_edits_sys_path():
    """The package is installed (pyproject.toml, `make`), so scripts and tests import it as is."""
    root = PACKAGE.parent
    scripts = [p for folder in ("launch", "tools", "tests") for p in (root / folder).rglob("*.py")]
    assert len(scripts) > 20
    edits = ("sys.path." + "insert", "sys.path." + "append")  # split: this file is scanned too
    offenders = [str(p.relative_to(root)) for p in scripts
                 if any(edit in p.read_text() for edit in edits)]
    assert not offenders
