"""ruff over the whole repository, and every package imports (a lint step inside the test command)."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("module", ["kto_lite", "kto_lite.training.recipe", "kto_lite.feedback.chat", "kto_lite.export.adapter",
                                    "kto_lite.memory", "kto_lite.commands.data", "ui.app"])
def test_imports(module):
    importlib.import_module(module)
