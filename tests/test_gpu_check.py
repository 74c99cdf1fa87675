"""benchmarks/gpu_check.py: refuses clearly without CUDA, and its checks run end to end (CPU dry run)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_refuses_without_cuda(gpu_check, capsys):
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "bench_vs_trl.py --preset cpu" in err


def test_unknown_model_is_a_usage_error(gpu_check):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--cpu-dry-run", "--models", "gpt-5"])
    assert e.value.code == 2


def test_dry_run_prints_the_table(gpu_check, tmp_path, capsys):
    """The same checks on CPU with a tiny model in fp32: head, packing, KTO steps, the report."""
    assert gpu_check.main(["--cpu-dry-run", "--steps", "2", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    report = out[out.index("### GPU check"):]
    row = next(line for line in report.splitlines() if line.startswith("| dry-run | fp32 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3].startswith("True")  # packing chosen for the tiny Llama
    assert float(cells[4]) < 1e-4 and float(cells[5]) < 1e-4  # head == own forward, packed == padded
    assert cells[6] == "True (2)" and float(cells[7].replace(",", "")) > 0


def test_gpu_shapes_are_the_real_ones(gpu_check):
    from transformers import AutoConfig, AutoModelForCausalLM

    preset = gpu_check.MODELS["gemma-2-2b"]
    config = AutoConfig.for_model("gemma2", **preset.shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(2.61, abs=0.01)
