"""The Colab notebooks run top to bottom as a user runs them (nbclient, a fresh kernel in an empty folder).

kto_lite comes in through the install cell's documented source, `KTO_LITE_SOURCE` (this checkout's
folder, or a zip of it), and the built-in demo model through the parameters cell's `MODEL = ""`; both are
set papermill-style, by a cell right after the parameters cell, never by editing the notebook's cells.
"""

import os
import re
import zipfile
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from kto_lite.demo import DEMO_SAMPLES

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "recipes" / "colab_kto.ipynb"
LOOP_NOTEBOOK = ROOT / "recipes" / "colab_loop.ipynb"
INSTALL_CELL = 3  # "1. Install"'s code cell, after the parameters cell and its heading


def with_parameters(path: Path, **values) -> nbformat.NotebookNode:
    """The notebook with a cell setting `values` right after its one cell tagged 'parameters'."""
    nb = nbformat.read(path, as_version=4)
    params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    for name in values:  # only documented parameters are set
        assert f"\n{name} = " in "\n" + nb.cells[params[0]].source, f"{name} is not a parameter of {path.name}"
    nb.cells.insert(params[0] + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items())))
    return nb


def execute(nb: nbformat.NotebookNode, folder: Path) -> str:
    """Run every cell in a new kernel whose working folder is `folder` (kto_lite is not importable there until
    the install cell runs); returns the cells' printed text."""
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("KTO_LITE_CACHE", os.environ.get("KTO_LITE_CACHE", str(tmp_path / "cache")))
    monkeypatch.delenv("PYTHONPATH", raising=False)  # kto_lite comes from the install cell alone


def test_both_notebooks_install_kto_lite_with_the_same_cell():
    cells = [nbformat.read(p, as_version=4).cells[INSTALL_CELL].source for p in (NOTEBOOK, LOOP_NOTEBOOK)]
    assert cells[0] == cells[1] and "KTO_LITE_SOURCE" in cells[0]


@pytest.mark.slow
def test_colab_notebook_executes_with_the_demo_model(tmp_path, offline):
    nb = with_parameters(NOTEBOOK, KTO_LITE_SOURCE=str(ROOT), MODEL="", DATASET=str(DEMO_SAMPLES["kto"]),
                         MAX_STEPS=2, OUTPUT_DIR=str(tmp_path / "run"), QUESTIONS=["What is 3 + 4?"])
    try:
        outputs = execute(nb, tmp_path)
    except CellExecutionError as e:  # the failing cell's output, not only the kernel error
        pytest.fail(f"notebook failed: {e}")
    assert "tuned:" in outputs and "adapter archive:" in outputs
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_colab_loop_notebook_executes_with_the_demo_model(tmp_path, offline):
    # the demo model knows "What is A + B?" with A, B <= 50, answered "A + B = C."
    nb = with_parameters(LOOP_NOTEBOOK, KTO_LITE_SOURCE=str(ROOT), MODEL="", OPERATION="+", MAX_OPERAND=50,
                         PROMPT_SUFFIX="", TRAIN_PROMPTS=24, EVAL_PROMPTS=16, ROUNDS=2, MAX_NEW_TOKENS=16,
                         OUTPUT_DIR=str(tmp_path / "loop"), CHAT_QUESTIONS=["What is 3 + 4?"])
    try:
        outputs = execute(nb, tmp_path)  # the notebook writes my_judge.py into its working folder
    except CellExecutionError as e:
        pytest.fail(f"notebook failed: {e}")
    assert "True False" in outputs  # the judge cell's check
    assert "| 2 | " in outputs and "tuned:" in outputs  # the table has round 2; the chat ran
    for r in (1, 2):
        assert (tmp_path / "loop" / f"round-{r}" / "adapter_model.safetensors").is_file()
        assert (tmp_path / "loop" / f"round-{r}" / "samples.jsonl").is_file()


def install_only(source: str) -> nbformat.NotebookNode:
    """The parameters and install cells alone, then a cell that says where kto_lite was imported from."""
    nb = with_parameters(NOTEBOOK, KTO_LITE_SOURCE=source)
    nb.cells = nb.cells[: INSTALL_CELL + 2] + [nbformat.v4.new_code_cell("import kto_lite\nprint(kto_lite.__file__)")]
    return nb


def test_install_cell_stops_with_one_sentence_when_no_source_is_given(tmp_path, offline):
    with pytest.raises(CellExecutionError) as e:
        execute(install_only(""), tmp_path)
    shown = re.sub(r"\x1b\[[0-9;]*m", "", str(e.value))  # IPython colours the exception's name
    assert "SystemExit: kto_lite is not installed: set KTO_LITE_SOURCE in the parameters cell" in shown


@pytest.mark.slow
def test_install_cell_takes_an_uploaded_zip_of_the_repository(tmp_path, offline):
    archive = tmp_path / "kto_lite-main.zip"  # as GitHub's "Download ZIP" makes it: one top folder
    with zipfile.ZipFile(archive, "w") as z:
        z.write(ROOT / "requirements.txt", "kto_lite-main/requirements.txt")
        for path in (ROOT / "kto_lite").rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                z.write(path, f"kto_lite-main/{path.relative_to(ROOT)}")
    outputs = execute(install_only(str(archive)), tmp_path)
    assert str(tmp_path / "kto_lite-main" / "kto_lite-main" / "kto_lite" / "__init__.py") in outputs
