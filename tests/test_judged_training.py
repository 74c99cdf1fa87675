"""Judged success inside training (kto_lite/training/judged.py) on the built-in demo model.

The demo model answers small sums right about half the time (recipes/demo_task.py), so its own answers to
held-out sums, judged `exact`, move visibly within a few steps: up when it trains on the shipped feedback, down
when it trains on the same feedback with the labels flipped (a run whose best moment is its start: what
keep_best and early stopping are for).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from tiny_models import stop_at_step

import kto_lite.training.recipe as recipe_module
from kto_lite.commands.train import main as train_main
from kto_lite.config import TrainConfig
from kto_lite.demo import DEMO_MODEL_DIR, DEMO_SAMPLES
from kto_lite.errors import ConfigError
from kto_lite.feedback.evaluate import evaluate_one
from kto_lite.feedback.loop import LoopArgs, run_loop
from kto_lite.feedback.sample import SampleArgs
from kto_lite.generation import load_models, model_spec, read_prompts
from kto_lite.judges import JudgeSpecError, make_judge
from kto_lite.runs import RunDir, read_metrics, read_status
from kto_lite.training.judged import SAMPLES_KEPT, JudgedEvaluation, judged_samples
from kto_lite.training.recipe import Recipe, summary, train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
import demo_task  # noqa: E402
import real_task  # noqa: E402

SAMPLING = dict(eval_samples_per_prompt=2, eval_temperature=1.0, eval_top_p=1.0, eval_max_new_tokens=16)
JUDGED = ("eval_judged_success", "eval_judged_success_low", "eval_judged_success_high")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("judged")
    demo_task.write_prompts(root / "eval.jsonl", 48, seed=1, split="eval")
    rows = [json.loads(line) for line in DEMO_SAMPLES["kto"].read_text().splitlines()]
    (root / "flipped.jsonl").write_text("".join(json.dumps({**r, "label": not r["label"]}) + "\n" for r in rows))
    return root


def config(workdir: Path, name: str, **kw) -> TrainConfig:
    values = dict(model=str(DEMO_MODEL_DIR), data=str(DEMO_SAMPLES["kto"]), output_dir=str(workdir / name),
                  load_in_4bit=False, max_steps=4, eval_steps=2, save_steps=0, batch_size=8,
                  gradient_accumulation_steps=2, max_length=64, max_prompt_length=32, seed=0,
                  eval_prompts=str(workdir / "eval.jsonl"), judge="exact", **SAMPLING)
    return TrainConfig(**{**values, **kw})


def sampled_accuracy(workdir: Path, adapter: str | None) -> float:
    """`python -m kto_lite evaluate`'s number for the base (None) or an adapter, with the same sampling and seed."""
    loaded = load_models(model_spec(str(DEMO_MODEL_DIR), [adapter] if adapter else [], load_in_4bit=False))
    prompts = read_prompts(workdir / "eval.jsonl")
    args = SampleArgs(n=2, temperature=1.0, top_p=1.0, max_new_tokens=16, seed=0, judge="exact")
    return evaluate_one(loaded, adapter, prompts, make_judge("exact"), args, show_progress=False)[0].accuracy


@pytest.fixture(scope="module")
def judged_run(workdir):
    return train(config(workdir, "judged"), show_progress=False)


# --------------------------------------------------------------------------- what a run logs


@pytest.mark.slow
def test_a_run_logs_judged_success_from_step_0(judged_run):
    rows = read_metrics(judged_run)
    judged = [r for r in rows if "eval_judged_success" in r]
    assert [r["step"] for r in judged] == [0, 2, 4]  # before the first step, every eval_steps, the end
    assert set(rows[0]) == {"step", "epoch", *JUDGED}  # the step-0 line holds only the judged evaluation
    for r in judged:
        assert 0 <= r["eval_judged_success_low"] <= r["eval_judged_success"] <= r["eval_judged_success_high"] <= 1
    samples = judged_samples(judged_run)
    assert [s["step"] for s in samples] == [0] * SAMPLES_KEPT + [2] * SAMPLES_KEPT + [4] * SAMPLES_KEPT
    assert [s["prompt_index"] for s in samples[:SAMPLES_KEPT]] == list(range(SAMPLES_KEPT))
    first = samples[0]
    assert first["verdict"] == (first["answer"].strip() == first["reference"].strip())  # the judge's own verdict
    record = read_status(judged_run)["judged"]
    assert record["evaluations"] == 3 and record["kept"]["step"] == 4  # keep_best off: the last step
    assert "judged success" in summary(judged_run, {"state": "finished", "step": 4, "total_steps": 4,
                                                    "seconds": 1, "judged": record})


@pytest.mark.slow
def test_judged_success_is_what_evaluate_measures(judged_run, workdir):
    """Step 0 is the base (fresh LoRA adds nothing) and the end is the saved adapter: `evaluate` with the same
    sampling and seed draws the same answers, so it gets the same numbers."""
    judged = [r for r in read_metrics(judged_run) if "eval_judged_success" in r]
    assert judged[0]["eval_judged_success"] == sampled_accuracy(workdir, None)
    assert judged[-1]["eval_judged_success"] == sampled_accuracy(workdir, str(judged_run))


@pytest.mark.slow
def test_judging_leaves_training_unchanged(judged_run, workdir):
    """Sampling in eval mode and restoring training mode changes nothing the training computes (no dropout switched
    off, no random number taken from training's stream)."""
    plain = train(config(workdir, "plain", eval_prompts=None, judge=None), show_progress=False)
    losses = [[r["loss"] for r in read_metrics(run) if "loss" in r] for run in (judged_run, plain)]
    assert losses[0] == losses[1]
    judged, alone = (load_file(run / "adapter_model.safetensors") for run in (judged_run, plain))
    assert judged.keys() == alone.keys()
    assert all(torch.equal(judged[k], alone[k]) for k in judged)


@pytest.mark.slow
def test_the_same_weights_get_the_same_number(workdir):
    """Common random numbers: answer j to prompt i is drawn from its own seed at every evaluation."""
    loaded = load_models(model_spec(str(DEMO_MODEL_DIR), load_in_4bit=False))
    cfg = config(workdir, "crn")
    (workdir / "crn").mkdir()
    evaluation = JudgedEvaluation(cfg, read_prompts(workdir / "eval.jsonl"), make_judge("exact"),
                                  RunDir(workdir / "crn"), Accelerator(cpu=True), show_progress=False)
    first, again = (evaluation._evaluate(step, loaded.model, loaded.tokenizer) for step in (0, 1))
    assert (first.success, first.low, first.high) == (again.success, again.low, again.high)
    assert [s["answer"] for s in first.samples] == [s["answer"] for s in again.samples]
    other_seed = JudgedEvaluation(config(workdir, "crn", seed=1), evaluation.prompts, evaluation.judge,
                                  evaluation.run, evaluation.accelerator, show_progress=False)
    moved = other_seed._evaluate(0, loaded.model, loaded.tokenizer)
    assert [s["answer"] for s in moved.samples] != [s["answer"] for s in first.samples]  # the seed decides


# --------------------------------------------------------------------------- keep_best and early stopping


@pytest.mark.slow
def test_keep_best_keeps_the_best_checkpoint(workdir):
    """Training on flipped labels makes the answers worse: the best judged success is the start. Its checkpoint
    outlives save_total_limit 1 and becomes the run's adapter; the last weights stay in checkpoints/."""
    run = train(config(workdir, "keep_best", data=str(workdir / "flipped.jsonl"), learning_rate=3e-3,
                       max_steps=9, eval_steps=3, save_steps=3, save_total_limit=1, keep_best=True),
                show_progress=False)
    judged = [(r["step"], r["eval_judged_success"]) for r in read_metrics(run) if "eval_judged_success" in r]
    best_step = max(judged, key=lambda s: s[1])[0]  # the first of the best
    assert best_step != judged[-1][0], judged  # the run got worse: keeping the best matters
    folders = sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*"))
    assert folders == sorted({f"checkpoint-{best_step}", "checkpoint-9"})
    kept = load_file(run / "adapter_model.safetensors")
    for step, same in ((best_step, True), (9, False)):
        saved = load_file(run / "checkpoints" / f"checkpoint-{step}" / "adapter_model.safetensors")
        assert all(torch.equal(kept[k], saved[k]) for k in kept) == same
    status = read_status(run)
    assert status["judged"]["kept"]["step"] == best_step and "keep_best" in status["judged"]["kept"]["why"]


@pytest.mark.slow
def test_early_stopping_stops_after_patience_evaluations_without_improvement(workdir):
    run = train(config(workdir, "early", data=str(workdir / "flipped.jsonl"), learning_rate=3e-3, max_steps=30,
                       eval_steps=3, early_stopping_patience=2), show_progress=False)
    judged = [(r["step"], r["eval_judged_success"]) for r in read_metrics(run) if "eval_judged_success" in r]
    best = max(range(len(judged)), key=lambda i: (judged[i][1], -i))  # the first of the best
    assert len(judged) - 1 - best == 2  # stopped at the second evaluation after the best
    status = read_status(run)
    assert status["status"] == "finished" and status["step"] == judged[-1][0] < 30
    assert status["judged"]["stopped_early"]["step"] == judged[-1][0]
    assert (run / "checkpoints" / f"checkpoint-{judged[-1][0]}").is_dir()  # the last weights are kept


@pytest.mark.slow
def test_a_resumed_run_continues_the_record(judged_run, workdir, monkeypatch):
    """Stopped at step 3 and resumed: the same judged numbers and kept answers as the uninterrupted run."""
    with monkeypatch.context() as m:
        m.setattr(Recipe, "_stop_requested", stop_at_step(3))
        stopped = train(config(workdir, "resumed"), show_progress=False)
    assert read_status(stopped)["status"] == "stopped"
    train(config(workdir, "resumed", resume_from_checkpoint=True), show_progress=False)
    judged = [[(r["step"], r["eval_judged_success"]) for r in read_metrics(run) if "eval_judged_success" in r]
              for run in (judged_run, stopped)]
    assert judged[0] == judged[1]
    assert judged_samples(stopped) == judged_samples(judged_run)


# --------------------------------------------------------------------------- the loop


@pytest.mark.slow
def test_every_loop_round_logs_judged_success(tmp_path):
    """`loop` gives each round's training its held-out prompts, judge and draws: the round's metrics.jsonl starts at
    the previous round's number and ends at the round's own row of the table."""
    train_prompts = demo_task.write_prompts(tmp_path / "train.jsonl", 16, seed=1)
    heldout = demo_task.write_prompts(tmp_path / "eval.jsonl", 12, seed=2, split="eval")
    cfg = TrainConfig(model=str(DEMO_MODEL_DIR), output_dir=str(tmp_path / "run"), load_in_4bit=False, max_steps=2,
                      eval_steps=2, batch_size=4, gradient_accumulation_steps=1, save_steps=0, seed=0)
    sampling = SampleArgs(n=2, judge="exact", **demo_task.SAMPLING)
    table = run_loop(cfg, LoopArgs(2, str(train_prompts), str(heldout), sampling, eval_n=2), show_progress=False,
                     echo=lambda line: None)
    for r in (1, 2):
        judged = [row for row in read_metrics(tmp_path / "run" / f"round-{r}") if "eval_judged_success" in row]
        assert [row["step"] for row in judged] == [0, 2]
        assert judged[0]["eval_judged_success"] == table[r - 1]["accuracy"]  # where the round started
        assert judged[-1]["eval_judged_success"] == table[r]["accuracy"]  # the round's row


# --------------------------------------------------------------------------- settings checked before loading


def test_a_judge_that_cannot_work_fails_before_the_model_loads(workdir, monkeypatch, capsys):
    (workdir / "no_answers.jsonl").write_text('{"prompt": "What is 1 + 1?"}\n')
    monkeypatch.setattr(recipe_module, "load_base", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(JudgeSpecError, match="no column 'answer' or 'reference'"):
        train(config(workdir, "bad_judge", eval_prompts=str(workdir / "no_answers.jsonl")), show_progress=False)
    code = train_main(["--output_dir", str(workdir / "bad_judge_cli"), "--eval_prompts",
                       str(workdir / "no_answers.jsonl"), "--judge", "exact"])
    assert code == 2 and "compares against a reference answer" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"judge": "exact"}, "judge needs eval_prompts"),
        ({"eval_prompts": "p.jsonl"}, "eval_prompts needs judge"),
        ({"keep_best": True}, "keep_best need a judged evaluation"),
        ({"early_stopping_patience": 2}, "early_stopping_patience need a judged evaluation"),
        ({"eval_prompts": "p.jsonl", "judge": "exact", "early_stopping_patience": 0}, "must be >= 1"),
        ({"eval_prompts": "p.jsonl", "judge": "exact", "eval_samples_per_prompt": 0}, "must be >= 1"),
        ({"eval_prompts": "p.jsonl", "judge": "exact", "eval_top_p": 0}, "eval_top_p in"),
        ({"eval_prompts": "p.jsonl", "judge": "exact", "fsdp": True}, "fsdp shards"),
    ],
)
def test_judged_settings_are_checked_on_load(fields, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**fields)


# --------------------------------------------------------------------------- several processes


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_share_the_prompts_and_agree(judged_run, workdir):
    """torchrun --nproc_per_node 2 (gloo): each process samples every other prompt, the counts are gathered; the
    starting point's judged success and kept answers are those of one process (the same seeds)."""
    cfg = config(workdir, "ddp_judged")
    flags = [f"--{k}={v}" for k, v in cfg.to_dict().items()
             if v is not None and k in ("model", "data", "output_dir", "load_in_4bit", "max_steps", "eval_steps",
                                        "save_steps", "batch_size", "gradient_accumulation_steps", "max_length",
                                        "max_prompt_length", "seed", "eval_prompts", "judge", *SAMPLING)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           "-m", "kto_lite", "train", *flags]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = [r for r in read_metrics(workdir / "ddp_judged") if "eval_judged_success" in r]
    single = [r for r in read_metrics(judged_run) if "eval_judged_success" in r]
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert {k: rows[0][k] for k in JUDGED} == {k: single[0][k] for k in JUDGED}
    samples = judged_samples(workdir / "ddp_judged")
    assert samples[:SAMPLES_KEPT] == judged_samples(judged_run)[:SAMPLES_KEPT]  # written once, in prompt order
    assert len(samples) == 3 * SAMPLES_KEPT


# --------------------------------------------------------------------------- the real model


@pytest.mark.real_model
@pytest.mark.slow
def test_a_short_smollm2_run_logs_judged_success(tmp_path):
    """SmolLM2-135M-Instruct (GGUF from PyPI) in 4-bit, its own ChatML template, judged by `number` on the real task."""
    from real_model import smollm2_gguf

    rows = [r for a, b in ((3, 5), (2, 7), (6, 1), (4, 4)) for r in (
        {"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b}.", "label": True},
        {"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b + 1}.", "label": False})]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    real_task.write_prompts(tmp_path / "eval.jsonl", 8, seed=1, split="eval")
    run = train(TrainConfig(model=str(smollm2_gguf()), data=str(tmp_path / "train.jsonl"),
                            output_dir=str(tmp_path / "run"), max_steps=2, eval_steps=2, batch_size=4,
                            gradient_accumulation_steps=1, max_length=64, max_prompt_length=48, lora_r=8,
                            save_steps=0, seed=0, eval_prompts=str(tmp_path / "eval.jsonl"), judge="number",
                            eval_samples_per_prompt=2, eval_max_new_tokens=real_task.MAX_NEW_TOKENS),
                show_progress=False)
    judged = [r for r in read_metrics(run) if "eval_judged_success" in r]
    assert [r["step"] for r in judged] == [0, 2]
    for r in judged:
        assert 0 <= r["eval_judged_success_low"] <= r["eval_judged_success"] <= r["eval_judged_success_high"] <= 1
    assert all(s["answer"] for s in judged_samples(run))  # the model answered in its chat template
