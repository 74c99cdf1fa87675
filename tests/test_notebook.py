"""The Colab notebook runs top to bottom, with the built-in demo model swapped in by its parameters cell."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "recipes" / "colab_kto.ipynb"


def test_colab_notebook_executes_with_the_demo_model(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    from kto_lite.demo import DEMO_SAMPLES

    overrides = dict(MODEL="", DATASET=str(DEMO_SAMPLES["kto"]), MAX_STEPS=2, BATCH_SIZE=4,
                     GRADIENT_ACCUMULATION_STEPS=1, LEARNING_RATE=1e-3, MAX_LENGTH=64, MAX_PROMPT_LENGTH=32,
                     OUTPUT_DIR=str(tmp_path / "run"), INSTALL=False, PUSH_TO_HUB="",
                     QUESTIONS=["What is 3 + 4?"])
    # papermill-style: a cell right after the parameters cell overrides their values
    nb.cells.insert(params[0] + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in overrides.items())))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("KTO_LITE_CACHE", str(tmp_path / "cache"))
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    except Exception as e:  # show the failing cell's output, not only the kernel error
        pytest.fail(f"notebook failed: {e}")
    outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "tuned:" in outputs and "adapter archive:" in outputs
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


LOOP_NOTEBOOK = ROOT / "recipes" / "colab_loop.ipynb"


def test_colab_loop_notebook_executes_with_the_demo_model(tmp_path, monkeypatch):
    nb = nbformat.read(LOOP_NOTEBOOK, as_version=4)
    params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    # the demo model knows "What is A + B?" with A, B <= 50, answered "A + B = C."
    overrides = dict(MODEL="", OPERATION="+", MAX_OPERAND=50, PROMPT_SUFFIX="", TRAIN_PROMPTS=24, EVAL_PROMPTS=16,
                     SAMPLES_PER_PROMPT=2, ROUNDS=2, TEMPERATURE=1.0, TOP_P=1.0, MAX_NEW_TOKENS=16,
                     LEARNING_RATE=3e-4, LOAD_IN_4BIT=False, OUTPUT_DIR=str(tmp_path / "loop"), INSTALL=False,
                     CHAT_QUESTIONS=["What is 3 + 4?"])
    nb.cells.insert(params[0] + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in overrides.items())))
    # the notebook writes my_judge.py into its working folder: a temporary one, with kto_lite importable
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("KTO_LITE_CACHE", os.environ.get("KTO_LITE_CACHE", str(tmp_path / "cache")))
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    except Exception as e:
        pytest.fail(f"notebook failed: {e}")
    outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "True False" in outputs  # the judge cell's check
    assert "| 2 | " in outputs and "tuned:" in outputs  # the table has round 2; the chat ran
    for r in (1, 2):
        assert (tmp_path / "loop" / f"round-{r}" / "adapter_model.safetensors").is_file()
        assert (tmp_path / "loop" / f"round-{r}" / "samples.jsonl").is_file()
