"""python -m kto_lite evaluate: the interval against reference formulas, determinism across invocations,
the base's numbers independent of the adapters evaluated with it, and the exit codes."""

import json
import math
import sys
from pathlib import Path

import pytest

from kto_lite.commands.evaluate import main as evaluate_main
from kto_lite.demo import DEMO_MODEL_DIR
from kto_lite.judges import clustered_interval, wilson_interval

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import demo_task  # noqa: E402

SAMPLING = ["--load_in_4bit", "false", "--temperature", "1", "--top_p", "1", "--max_new_tokens", "16"]


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [  # scipy 1.17: binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        (0, 10, 0.0, 0.27753279986288926),
        (3, 10, 0.10779126740630102, 0.6032218525388546),
        (10, 10, 0.7224672001371109, 1.0),
        (41, 100, 0.31867313021136523, 0.5079856994658922),
        (700, 1600, 0.4133709700745029, 0.46192842507452875),
    ],
)
def test_wilson_interval_matches_scipy(k, n, low, high):
    assert wilson_interval(k, n) == pytest.approx((low, high), abs=1e-12)


def test_clustered_interval_is_wilson_when_prompts_agree_and_counts_prompts_when_samples_do():
    # every prompt right 2 of 4 times: no between-prompt variance, the samples count fully
    low, high, n_eff = clustered_interval([(2, 4)] * 25)
    assert n_eff == 100 and (low, high) == pytest.approx(wilson_interval(50, 100))
    # each prompt all right or all wrong: 4 samples per prompt say no more than 1; with the P/(P-1)
    # small-sample factor the effective size is P - 1 (worked out in evaluate.clustered_interval)
    per_prompt = [(4, 4)] * 10 + [(0, 4)] * 15
    low, high, n_eff = clustered_interval(per_prompt)
    assert n_eff == pytest.approx(24)
    assert (low, high) == pytest.approx(wilson_interval(0.4 * 24, 24))
    z = 1.959963984540054  # and Wilson's formula itself, written out
    center = (0.4 + z * z / 48) / (1 + z * z / 24)
    half = z / (1 + z * z / 24) * math.sqrt(0.4 * 0.6 / 24 + z * z / (4 * 24 * 24))
    assert (low, high) == pytest.approx((center - half, center + half))
    # all right: the interval still has width (Wilson), at the full sample count
    low, high, n_eff = clustered_interval([(4, 4)] * 5)
    assert n_eff == 20 and high == 1.0 and low == pytest.approx(wilson_interval(20, 20)[0]) and low < 1


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two random (not zero) LoRA adapters of the demo model: they change its answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapters")
    out = []
    for i, scale in enumerate((0.02, 0.05)):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, lora_alpha=4)
        peft_model = get_peft_model(model, lora)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, scale)
        peft_model.save_pretrained(folder / f"a{i}")
        out.append(str(folder / f"a{i}"))
    return out


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return str(demo_task.write_prompts(tmp_path_factory.mktemp("p") / "eval.jsonl", 40, seed=5, split="eval"))


def run_json(capsys, argv) -> dict:
    assert evaluate_main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_same_numbers_every_time_and_base_independent_of_adapters(capsys, adapters, prompts):
    argv = ["--model", str(DEMO_MODEL_DIR), "--prompts", prompts, "--judge", "exact", "--n", "3", *SAMPLING]
    first = run_json(capsys, [*argv, "--adapter", adapters[0], "--adapter", adapters[1]])
    again = run_json(capsys, [*argv, "--adapter", adapters[0], "--adapter", adapters[1], "--batch_size", "7"])
    assert first["results"] == again["results"]
    base, a0, a1 = first["results"]
    assert base["name"] == "base" and base["judged"] == 120 and a0["adapter"] == adapters[0]
    alone = run_json(capsys, argv)["results"]
    assert alone == [base]  # the base's samples do not depend on the adapters loaded next to it
    assert run_json(capsys, [*argv, "--adapter", adapters[1]])["results"][1] == a1
    assert len({base["accuracy"], a0["accuracy"], a1["accuracy"]}) > 1  # the adapters do change the answers
    for r in first["results"]:
        assert r["low"] <= r["accuracy"] <= r["high"] and r["correct"] == round(r["accuracy"] * r["judged"])


def test_table(capsys, prompts):
    assert evaluate_main(["--prompts", prompts, "--judge", "exact", "--n", "2", *SAMPLING]) == 0
    out = capsys.readouterr().out
    assert "40 prompts x 2 samples, judge exact" in out
    assert out.splitlines()[1].split() == ["model", "accuracy", "95%", "interval", "judged"]
    assert out.splitlines()[2].startswith("base ") and out.splitlines()[2].rstrip().endswith(" 80")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--judge", "nope"], "unknown judge"),
        (["--judge", "exact", "--reference_column", "gold"], "no column 'gold'"),
        (["--judge", "exact", "--adapter", "/no/such/run"], "no adapter here"),
    ],
)
def test_usage_errors_exit_2(capsys, prompts, argv, message):
    assert evaluate_main(["--prompts", prompts, *SAMPLING, *argv]) == 2
    assert message in capsys.readouterr().err


def test_judge_is_required(prompts):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--prompts", prompts])
    assert exit_info.value.code == 2
