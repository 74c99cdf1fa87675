"""benchmarks/rare_desirable.py and benchmarks/methods.py at a tiny size on the demo model (the real measurements
take hours on SmolLM2: docs/methods.md), BCO's loss by hand, and the format task's judge."""

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from kto_lite.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "recipes"))
import format_task  # noqa: E402
import methods  # noqa: E402
import rare_desirable  # noqa: E402

TINY = ["--train_prompts", "12", "--n", "2", "--eval_prompts", "6", "--eval_n", "2", "--max_steps", "2", "--quiet"]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_bco_loss_by_hand():
    """Rewards 0.1 * ([-1, -2] - [-1.5, -1]) = [0.05, -0.1]; delta = their running mean, -0.025, then
    desirable -log sigmoid(0.075) and undesirable -log sigmoid(-(-0.1 + 0.025)) = -log sigmoid(0.075)."""
    loss = methods.BCOLoss()
    out = loss(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), torch.tensor([True, False]), beta=0.1,
               z0=torch.tensor(0.3))  # BCO has no z0: it is ignored
    expected = -math.log(sigmoid(0.075))
    torch.testing.assert_close(out.losses, torch.tensor([expected, expected]))
    assert float(out.kl) == pytest.approx(-0.025)
    with torch.no_grad():  # evaluation leaves the running mean alone
        loss(torch.tensor([5.0]), torch.tensor([0.0]), torch.tensor([True]), beta=0.1)
    loss(torch.tensor([0.0]), torch.tensor([-1.0]), torch.tensor([True]), beta=0.1)  # reward 0.1
    assert loss.mean == pytest.approx((0.05 - 0.1 + 0.1) / 3)


@pytest.mark.parametrize(
    ("answer", "fmt", "right"),
    [
        ('{"answer": 8, "explanation": "3 plus 5 is 8."}', "json", True),
        ('```json\n{"answer": 8, "explanation": "..."}\n```', "json", True),  # in a code block, alone
        ('Sure! {"answer": 8, "explanation": "..."}', "json", False),  # not the object alone
        ('{"answer": 8}', "json", False),
        ('{"answer": 8}', "json_answer", True),
        ("3 + 5 = 8. DONE", "one_line_done", True),
        ("3 + 5 = 8.\nDONE", "one_line_done", False),
        ("The sum is <answer>8</answer>.", "tag", True),
    ],
)
def test_the_format_task_judges_the_format(answer, fmt, right):
    assert format_task.judge("What is 3 + 5?", answer, {"format": fmt, "answer": 8}) is right


def test_format_prompts_follow_the_real_task_split(tmp_path):
    rows = [json.loads(line) for line in format_task.write_prompts(tmp_path / "p.jsonl", 5, split="eval")
            .read_text().splitlines()]
    assert all(r["prompt"].endswith(format_task.FORMATS["json"][0]) and r["format"] == "json" for r in rows)
    assert all(format_task.real_task.split_of(*map(int, re.findall(r"\d", r["prompt"])[:2])) == "eval" for r in rows)


@pytest.mark.slow
def test_a_try_must_name_fields_and_values():
    assert rare_desirable.parse_try("epochs:num_epochs=3,beta=0.2") == ("epochs", {"num_epochs": 3, "beta": 0.2})
    for bad in ("num_epochs=3", "epochs:", "epochs:num_epochs", ":num_epochs=3"):
        with pytest.raises(Exception, match="expected NAME:FIELD=VALUE"):
            rare_desirable.parse_try(bad)
    with pytest.raises(SystemExit) as refused:  # a try is compared with the defaults on its own seed
        rare_desirable.main(["--seeds", "0", "--try_seeds", "1", "--workdir", "unused"])
    assert refused.value.code == 2


def test_rare_desirable_runs_at_a_tiny_size(tmp_path, capsys):
    results = tmp_path / "rare.json"
    assert rare_desirable.main(["--task", "demo", "--fractions", "1", "0.5", "--seeds", "0", "1", *TINY,
                                "--load_in_4bit", "false", "--workdir", str(tmp_path / "work"),
                                "--try", "flat:desirable_weight=1,undesirable_weight=1", "--try_seeds", "1",
                                "--results", str(results)]) == 0
    saved = json.loads(results.read_text())
    (flat,) = saved["tries"]  # the smallest fraction again, with the weights changed, against its defaults
    assert flat["changes"] == {"desirable_weight": 1, "undesirable_weight": 1}
    assert list(flat["pooled"]["vs"]["seeds"]) == ["1"]  # compared on its own seed only
    (run,) = flat["runs"]
    trained = TrainConfig.load(Path(run["run"]) / "config.yaml")
    assert (trained.desirable_weight, trained.undesirable_weight) == (1.0, 1.0) and "f0.5_s1_flat" in run["run"]
    assert "`desirable_weight: 1`, `undesirable_weight: 1`" in saved["table"]
    full, half = saved["rows"]
    assert half["counts"]["undesirable"] == full["counts"]["undesirable"]  # only desirable rows are cut
    assert half["counts"]["desirable"] == round(full["counts"]["desirable"] / 2)
    for row in saved["rows"]:
        assert [run["seed"] for run in row["runs"]] == [0, 1]
        for run in row["runs"]:
            assert 0 <= run["low"] <= run["success"] <= run["high"] <= 1 and len(run["per_prompt"]) == 6
    assert list(half["pooled"]["vs"]["seeds"]) == ["0", "1"] and "50%" in capsys.readouterr().out
    assert saved["environment"]["command"] and saved["environment"]["load_average"]


@pytest.mark.slow
def test_methods_runs_every_variant_at_a_tiny_size(tmp_path, capsys):
    results = tmp_path / "methods.json"
    assert methods.main(["--tasks", "demo", "--seeds", "0", "--rounds", "2", *TINY, "--load_in_4bit", "false",
                         "--workdir", str(tmp_path / "work"), "--results", str(results)]) == 0
    summary = json.loads(results.read_text())["summary"]
    for variant in ("kto", "humanline", "bco"):
        for r in (1, 2):
            entry = summary[f"demo/{variant}/round-{r}"]
            assert 0 <= entry["success"] <= 1
            assert ("vs_kto" in entry) == (variant != "kto")
    # the variants start from the same feedback: round 1's training data is the same file for all
    data = {v: (tmp_path / "work" / "demo" / v / "seed-0" / "round-1" / "samples.jsonl").read_text()
            for v in ("kto", "humanline", "bco")}
    assert data["kto"] == data["humanline"] == data["bco"]
    assert TrainConfig.load(tmp_path / "work" / "demo" / "humanline" / "seed-0" / "round-1" / "config.yaml").humanline
    assert "| demo | humanline | 1 |" in capsys.readouterr().out
    # --finished_only reads the finished runs back and trains nothing: seed 1 never ran, so it is left out
    again = tmp_path / "again.json"
    assert methods.main(["--tasks", "demo", "--seeds", "0", "1", "--rounds", "2", *TINY, "--load_in_4bit", "false",
                         "--workdir", str(tmp_path / "work"), "--results", str(again), "--finished_only"]) == 0
    assert json.loads(again.read_text())["summary"] == json.loads(json.dumps(summary))
    assert not (tmp_path / "work" / "demo" / "kto" / "seed-1").exists()


def _eval_samples(folder: Path, labels: dict[int, list[int]]) -> dict:
    """A finished round's eval_samples.jsonl as the loop writes it (label None: the judge could not label it)."""
    folder.mkdir(parents=True)
    (folder / "eval_samples.jsonl").write_text("".join(
        json.dumps({"prompt_index": i, "sample_index": j, "completion": ""}
                   | ({"judge_error": "no number"} if y is None else {"label": y})) + "\n"
        for i, ys in labels.items() for j, y in enumerate(ys)))
    return {"adapter": str(folder)}


def test_variants_are_paired_with_kto_by_prompt_on_the_seeds_both_ran(tmp_path):
    """Seed 0: differences per prompt [+0.5, 0, -1] (mean -1/6); seed 1: [+1, +0.5, 0] (mean +0.5); seed 2 only
    KTO ran. Pooled: each prompt averaged over the two seeds, [0.75, 0.25, -0.5], then their mean and a 95%
    interval over the three prompts; a prompt the judge labeled nothing in is left out of that seed."""
    kto = {0: _eval_samples(tmp_path / "k0", {0: [0, 1], 1: [1, 1], 2: [1, 1]}),
           1: _eval_samples(tmp_path / "k1", {0: [0, 0], 1: [0, 1], 2: [0, 0], 3: [1, 1]}),
           2: _eval_samples(tmp_path / "k2", {0: [1, 1], 1: [1, 1], 2: [1, 1]})}
    variant = {0: _eval_samples(tmp_path / "v0", {0: [1, 1], 1: [1, 1], 2: [0, 0]}),
               1: _eval_samples(tmp_path / "v1", {0: [1, 1], 1: [1, 1], 2: [0, 0], 3: [None, None]})}
    out = methods.paired(variant, kto)
    assert out["seeds"] == {0: pytest.approx(-1 / 6, abs=1e-4), 1: 0.5}
    pooled = [0.75, 0.25, -0.5]
    mean, sd = sum(pooled) / 3, math.sqrt(sum((x - sum(pooled) / 3) ** 2 for x in pooled) / 2)
    assert out["diff"] == pytest.approx(mean)
    assert out["high"] - out["diff"] == pytest.approx(1.959963984540054 * sd / math.sqrt(3))
    assert methods.paired(variant, {2: kto[2]}) is None  # no seed in common
