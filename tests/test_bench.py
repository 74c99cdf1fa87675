"""benchmarks/bench_vs_trl.py runs end to end on its smoke preset and prints its table (no timing asserts)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vs_trl.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vs_trl", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_vs_trl"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_preset_prints_the_table(bench, tmp_path, capsys):
    # one side of each kind (kto_lite via train, kto_lite pieces, TRL, kto_lite's SFT step): subprocesses
    out_md = tmp_path / "results.md"
    code = bench.main(["--preset", "smoke", "--steps", "1", "--sides", "kto_lite,kto_pieces,trl,sft_head",
                       "--workdir", str(tmp_path / "work"), "--output", str(out_md)])
    printed = capsys.readouterr().out
    assert code == 0
    table = printed[printed.index("### smoke"):]
    assert "| run | time (s) |" in table and "| tokens/s |" in table and "reference passes (s)" in table
    for label in ("kto_lite (train)", "kto_lite pieces (packed KTO loop)", "TRL KTOTrainer (defaults)",
                  "SFT step (kto_lite head, same rows)"):
        assert f"| {label} |" in table
    assert "| TRL KTOTrainer (defaults) | " in table and "| 1.00x |" in table  # the ratio baseline
    assert "KTO step / kto_lite's SFT step" in table and "Targets (wall time):" in table
    assert "KL rows, padded positions / real tokens" in table and "Reference passes of" in table
    assert "- Ceiling: a KTO run does at least" in table  # kto_lite, sft_head and trl all ran
    # step 1: policy == reference on every side, so every KTO loss is 0.5
    line = next(line for line in table.splitlines() if line.startswith("- Step-1 losses"))
    losses = dict(item.split() for item in line.split("): ")[1].rstrip(".").split(", "))
    assert set(losses) == {"kto_lite", "kto_pieces", "trl"}
    for value in losses.values():
        assert float(value) == pytest.approx(0.5, abs=1e-4)
    # the same tokens were trained on by every side
    results = [json.loads(p.read_text()) for p in (tmp_path / "work").glob("result_*.json")]
    assert len(results) == 4 and len({r["tokens"] for r in results}) == 1 and results[0]["tokens"] > 0
    assert out_md.read_text().strip().startswith("### smoke")


def test_rows_have_a_spread_of_lengths_and_both_labels(bench):
    preset = bench.PRESETS["cpu"]
    rows = bench.make_rows(preset, 200)
    prompts = [len(r["prompt"].split()) for r in rows]
    completions = [len(r["completion"].split()) for r in rows]
    assert max(prompts) < preset.max_prompt_length  # + BOS: no prompt is truncated
    assert max(completions) > 3 * min(completions) and max(prompts) > 3 * min(prompts)
    assert {r["label"] for r in rows} == {True, False}
    assert all(r["completion"].startswith(" ") for r in rows)


@pytest.mark.parametrize("preset,billions", [("qwen2.5-0.5b", 0.494), ("llama-3.1-8b", 8.03)])
def test_gpu_presets_have_the_real_shapes(bench, preset, billions):
    model_cls, config = bench.model_config(bench.PRESETS[preset])
    with torch.device("meta"):  # shapes only, no memory
        model = model_cls(config)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.01)
    assert bench.PRESETS[preset].device == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
@pytest.mark.parametrize("preset", ["qwen2.5-0.5b", "llama-3.1-8b"])
def test_gpu_presets_refuse_clearly_without_cuda(bench, preset, capsys):
    assert bench.main(["--preset", preset]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.real_model
def test_real_model_preset_rows_are_chat_formatted(bench):
    """smollm2: the demo's feedback rows in SmolLM2's chat template, identical text for every side."""
    from real_model import smollm2_dir

    preset = bench.PRESETS["smollm2"]
    assert preset.model == "smollm2" and preset.epochs == 2 and not preset.load_in_4bit
    assert not preset.gradient_checkpointing
    rows = bench.demo_rows(smollm2_dir())
    assert len(rows) == 400 and {r["label"] for r in rows} == {True, False}
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") and r["completion"].endswith("<|im_end|>")
               for r in rows)
