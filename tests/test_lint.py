"""The lint steps inside the test command: ruff over the whole repository, the import contracts in
pyproject.toml (import-linter: imports go downward only), and every package imports."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_contracts_are_kept():
    """`lint-imports` (the script next to this interpreter) reads the contracts from pyproject.toml in cwd."""
    script = Path(sys.executable).with_name("lint-imports")
    command = [str(script)] if script.is_file() else ["lint-imports"]
    result = subprocess.run([*command, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_library_import_hides_inside_a_function():
    """kto_lite imports kto_lite at the top of each module: an import inside a function would hide a cycle or an
    upward dependency from the import contracts (third-party imports may stay lazy)."""
    hidden = []
    for path in sorted((ROOT / "kto_lite").rglob("*.py")):
        for function in ast.walk(ast.parse(path.read_text())):
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                hidden += [f"{path.relative_to(ROOT)}:{node.lineno}" for node in ast.walk(function)
                           if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kto_lite")
                           or isinstance(node, ast.Import) and any(a.name.startswith("kto_lite") for a in node.names)]
    assert not hidden, hidden


@pytest.mark.parametrize("module", ["kto_lite", "kto_lite.training.recipe", "kto_lite.feedback.chat", "kto_lite.export.adapter",
                                    "kto_lite.memory", "kto_lite.commands.data", "ui.app"])
def test_imports(module):
    importlib.import_module(module)
