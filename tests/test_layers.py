"""The package layout is the data flow: no module imports from a layer above its own.

Layers, bottom to top (docs/development.md, "Layout"): shared utilities; model families; the demo world's
data; the three stages (analysis, editing, verify); audit; studies; the entry points. Imports
inside functions count too: a lazy import is still a dependency.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "factedit"

LAYERS = [
    {"errors", "_version", "io", "paths", "recipes", "plots", "validate", "integrity"},
    {"models"},
    {"world"},
    {"analysis"},
    {"editing"},
    {"verify"},
    {"audit"},
    {"studies"},
    {"demo", "demo_real", "cli", "cli_common", "cli_launch", "cli_models", "cli_pools", "cli_recipe", "cli_study",
     "__init__", "__main__"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str:
    """factedit.analysis.locate -> analysis; factedit.io -> io; factedit -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "factedit" else [f"factedit.{a.name}" for a in node.names]
            out += [(node.lineno, n) for n in names if n.split(".")[0] == "factedit"]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "factedit"]
    return out


MODULES = sorted(PKG.rglob("*.py"))


def test_every_unit_has_a_layer():
    units = {p.relative_to(PKG).parts[0].removesuffix(".py") for p in MODULES}
    assert units <= set(RANK), f"place {sorted(units - set(RANK))} in LAYERS (and in the layout of docs/development.md)"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_reaches_up(path):
    own = _unit("factedit." + ".".join(path.relative_to(PKG).with_suffix("").parts))
    upward = [f"line {line}: {mod} (layer {RANK[_unit(mod)]} > {RANK[own]})"
              for line, mod in _imports(path) if RANK.get(_unit(mod), -1) > RANK[own]]
    assert not upward, f"{path.relative_to(ROOT)} ({own}, layer {RANK[own]}) imports from above: {upward}"


def test_version_matches_pyproject():
    import factedit

    (version,) = re.findall(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert factedit.__version__ == version


@pytest.mark.slow
def test_the_public_api_imports_in_a_fresh_interpreter():
    """``factedit.verify`` is the stage's function beside ``locate`` and ``edit`` (exported in
    ``__all__``), and importing the package (or any stage first) runs into no import cycle."""
    import subprocess
    import sys

    code = ("import factedit.verify.checks, factedit; from factedit.verify import run; "
            "assert factedit.verify is run.verify and {'locate', 'edit', 'verify'} <= set(factedit.__all__); "
            "assert all(hasattr(factedit, n) for n in factedit.__all__)")
    for first in ("import factedit", "import factedit.editing.export", "import factedit.verify.run"):
        res = subprocess.run([sys.executable, "-c", f"{first}; {code}"], cwd=ROOT, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
