"""recipes/real_task.py (the real-model task of docs/defaults.md): splits, prompt files, judge. No model."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from kto_lite.generation import read_prompts
from kto_lite.judges import make_judge

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "real_task.py"


@pytest.fixture(scope="module")
def task():
    spec = importlib.util.spec_from_file_location("real_task", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _facts(rows):
    return {frozenset((r["a"], r["b"])) for r in rows}


def test_splits_hold_disjoint_sums_in_every_phrasing(task):
    train, held_out = task.all_rows("train"), task.all_rows("eval")
    assert not _facts(train) & _facts(held_out)  # not even b + a for a held-out a + b
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert len(train) + len(held_out) == 100 * len(task.PHRASINGS)  # every ordered pair, every phrasing
    assert len(held_out) >= 200 and len(train) >= 300  # the sizes docs/defaults.md uses fit
    for row in train + held_out:
        a, b = (int(x) for x in re.findall(r"\d+", row["prompt"]))
        assert (a, b) == (row["a"], row["b"]) and row["answer"] == a + b


def test_prompt_rows_are_distinct_and_seeded(task):
    rows = task.prompt_rows(150, seed=0, split="train")
    assert len({r["prompt"] for r in rows}) == 150
    assert rows == task.prompt_rows(150, seed=0, split="train")
    assert rows != task.prompt_rows(150, seed=1, split="train")
    with pytest.raises(ValueError, match="cannot choose"):
        task.prompt_rows(10_000, split="eval")
    with pytest.raises(ValueError, match="split"):
        task.prompt_rows(1, split="test")


def test_practised_phrasings_ask_trained_sums_in_unseen_prompts(task, tmp_path):
    training = task.write_prompts(tmp_path / "train.jsonl", 150, split="train")
    rows = [json.loads(line) for line in task.write_prompts(tmp_path / "phrasings.jsonl", 200, seed=2,
                                                            practised=training).read_text().splitlines()]
    trained = [json.loads(line) for line in training.read_text().splitlines()]
    assert len({r["prompt"] for r in rows}) == 200
    assert not {r["prompt"] for r in rows} & {r["prompt"] for r in trained}  # no training prompt again
    assert _facts(rows) <= _facts(trained)  # only sums the training prompts ask
    with pytest.raises(ValueError, match="cannot choose"):
        task.practised_rows(10_000, trained)


@pytest.mark.parametrize(("completion", "right"), [
    ("3 + 5 = 8.", True),
    ("The answer is 8", True),
    ("Adding 3 and 5 gives 8, which is the sum.", True),
    ("3 + 5 = 9", False),
    ("8 + 1 = 9", False),  # the right number early, a wrong one last
    ("Three plus five is eight.", False),  # no digits: the judge cannot see the number
    ("To calculate 3 + 5, we first", False),  # cut off before the answer
    ("", False),
])
def test_judge_matches_kto_lites_number_judge(task, tmp_path, completion, right):
    path = task.write_prompts(tmp_path / "p.jsonl", 5, split="eval")
    prompts = read_prompts(path)
    row = {"prompt": "Add 3 and 5.", "answer": 8, "a": 3, "b": 5}
    assert task.judge(row["prompt"], completion, row) is right
    assert make_judge(task.JUDGE)(row["prompt"], completion, row) is right  # the CLI's --judge number agrees
    assert prompts.columns[:2] == ["prompt", "answer"] and len(prompts.rows) == 5


def test_grid_paired_difference_is_the_mean_per_prompt_difference_with_its_interval():
    spec = importlib.util.spec_from_file_location("defaults_grid", RECIPE.parents[1] / "benchmarks" / "defaults_grid.py")
    grid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid)
    # prompt 0: a right twice, b once; prompt 1: a once, b never; prompt 2: both never; a judge error is ignored
    a = [{"prompt_index": 0, "label": True}, {"prompt_index": 0, "label": True}, {"prompt_index": 1, "label": True},
         {"prompt_index": 1, "label": False}, {"prompt_index": 2, "label": False}, {"prompt_index": 2, "judge_error": "x"}]
    b = [{"prompt_index": 0, "label": True}, {"prompt_index": 0, "label": False}, {"prompt_index": 1, "label": False},
         {"prompt_index": 1, "label": False}, {"prompt_index": 2, "label": False}, {"prompt_index": 2, "label": False}]
    d = grid.paired_difference(a, b)
    diffs = [0.5, 0.5, 0.0]
    mean = sum(diffs) / 3
    sd = (sum((x - mean) ** 2 for x in diffs) / 2) ** 0.5
    assert d["prompts"] == 3 and d["diff"] == pytest.approx(mean)
    assert d["high"] - d["diff"] == pytest.approx(1.959963984540054 * sd / 3 ** 0.5)
