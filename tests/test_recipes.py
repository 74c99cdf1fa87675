"""Every shipped recipe parses into a TrainConfig, fits the GPU tier it states, and states the estimate
the estimator gives today; the UltraFeedback converter makes rows kto_lite reads."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from kto_lite.config import TrainConfig
from kto_lite.data import load_data
from kto_lite.files import GIB
from kto_lite.memory import estimate_memory, find_gpu

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
YAMLS = sorted(RECIPES.glob("*.yaml"))
MAX_FILL = 0.90  # leave 10% of the card for the desktop, other processes and allocator fragmentation


def header(path: Path) -> dict[str, str]:
    """The `# key: value` lines of a recipe's header comment."""
    fields = {}
    for line in path.read_text().splitlines():
        match = re.match(r"#\s*(\w+):\s*(.+)$", line)
        if match:
            fields[match[1]] = match[2].strip()
    return fields


def test_there_is_a_recipe_per_model_and_task():
    names = {p.name for p in YAMLS}
    assert {"ultrafeedback_binarized.yaml", "chat_feedback.yaml"} <= names
    assert len(names) >= 10


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_recipe_is_a_valid_config(path):
    config = TrainConfig.load(path)
    assert config.model and config.data and config.output_dir.startswith("runs/")
    assert config.batch_size >= 4  # z0 is estimated on each batch (docs/design.md, "The loss")
    assert 16 <= config.batch_size * config.gradient_accumulation_steps <= 128


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_recipe_fits_its_tier_and_states_the_current_estimate(path):
    fields = header(path)
    tier, target = float(fields["vram_tier_gb"]), fields["target_gpu"]
    gpu = find_gpu(target)
    budget = min(tier, gpu.vram_gib) if gpu else tier  # e.g. a T4 has 15 of its 16 GB free
    processes = int(fields.get("processes", 1))  # an FSDP recipe: the memory of each of its GPUs
    estimate = estimate_memory(TrainConfig.load(path), gpu_name=target, processes=processes)
    assert estimate.total <= MAX_FILL * budget * GIB, f"{estimate.total / GIB:.2f} GiB > {MAX_FILL:.0%} of {budget} GiB"
    stated = float(fields["estimated_peak_gib"].split()[0])
    assert stated == pytest.approx(estimate.total / GIB, abs=0.02), "header out of date: regenerate its estimate"
    assert fields["measured_peak_gib"]  # a number once measured on the card, "not yet measured" until then


# ---------------------------------------------------------------------- the README's GPU table
def gpu_table():
    spec = importlib.util.spec_from_file_location("gpu_table", RECIPES / "gpu_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_gpu_table_is_the_one_the_estimator_generates():
    """One source of truth: the committed table is recipes/gpu_table.py's output, not typed numbers."""
    table = gpu_table()
    assert table.committed() == table.table(), "out of date: run python recipes/gpu_table.py"


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_readme_row_says_the_smallest_card_that_fits(path):
    """A recipe is listed for the smallest card it fits (an 8.4 GiB run is a 12 GB card's, not only a T4's)."""
    table = gpu_table()
    row = next(line for line in table.table().splitlines() if f"[`{path.name}`]" in line)
    processes = int(header(path).get("processes", 1))
    config = TrainConfig.load(path)
    fits = [name for name in table.CARDS if estimate_memory(config, gpu_name=name, processes=processes).total
            <= MAX_FILL * find_gpu(name).vram_gib * GIB]
    assert fits and f"{fits[0]} ({table.CARDS[fits[0]]} GB)" in row
    assert f"{header(path)['estimated_peak_gib'].split()[0]} GiB" in row  # the header states the same estimate


# ---------------------------------------------------------------------- prepare_ultrafeedback.py
def converter():
    spec = importlib.util.spec_from_file_location("prepare_ultrafeedback", RECIPES / "prepare_ultrafeedback.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def conversation(prompt, reply):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


ULTRAFEEDBACK_ROWS = [  # the columns of HuggingFaceH4/ultrafeedback_binarized
    {"prompt": "What is 2+2?", "prompt_id": "a", "chosen": conversation("What is 2+2?", "4."),
     "rejected": conversation("What is 2+2?", "5, probably."), "messages": [], "score_chosen": 9.0,
     "score_rejected": 3.0},
    {"prompt": "Name a color.", "prompt_id": "b", "chosen": conversation("Name a color.", "Blue."),
     "rejected": conversation("Name a color.", "Red."), "messages": [], "score_chosen": 7.0,
     "score_rejected": 7.0},  # a tie: no preference
    {"prompt": "Say hi.", "prompt_id": "c", "chosen": conversation("Say hi.", "Hi!"),
     "rejected": conversation("Say hello.", "Hello!"), "messages": [], "score_chosen": 8.0,
     "score_rejected": 2.0},  # different prompts
]


def test_to_paired_row_splits_the_shared_prompt_from_the_replies():
    prepare = converter()
    assert prepare.to_paired_row(ULTRAFEEDBACK_ROWS[0]) == {
        "prompt": [{"role": "user", "content": "What is 2+2?"}], "chosen": "4.", "rejected": "5, probably."}
    assert prepare.to_paired_row(ULTRAFEEDBACK_ROWS[1]) is None
    assert prepare.to_paired_row(ULTRAFEEDBACK_ROWS[2]) is None
    assert prepare.to_paired_row(ULTRAFEEDBACK_ROWS[0], min_score_gap=7) is None
    plain = {"prompt": "Q?", "chosen": "good", "rejected": "bad"}
    assert prepare.to_paired_row(plain) == plain


def test_written_file_loads_as_one_desirable_and_one_undesirable_example_per_pair(tmp_path):
    import datasets

    rows = datasets.Dataset.from_list(ULTRAFEEDBACK_ROWS)  # what load_dataset returns, built in memory
    out = tmp_path / "data" / "ultrafeedback_kto.jsonl"
    written, skipped = converter().write_pairs(rows, out)
    assert (written, skipped) == (1, 2)
    assert json.loads(out.read_text().splitlines()[0])["chosen"] == "4."
    examples, _ = load_data(out)
    assert [e.label for e in examples] == [True, False]
    assert examples[0].prompt == examples[1].prompt
