"""The Rate tab's handlers as functions: prompts from every format, n answers per prompt with the demo
model and a run's adapter, thumbs and judges, the feedback file, and the next round's command."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import gradio as gr
import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from kto_lite.commands.train import train_config
from kto_lite.config import TrainConfig
from kto_lite.data import encode_prompt, load_data, tokenize
from kto_lite.demo import DEMO_MODEL_DIR, DEMO_SAMPLES
from kto_lite.errors import DataError
from ui import jobs
from ui import runs as ui_runs
from ui.tabs import chat, rate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from demo_task import judge as demo_judge  # noqa: E402

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
PROMPTS = "What is 2 + 3?\n\nWhat is 10 - 4?\n"
GEN = dict(max_prompts=8, n=3, temperature=1.0, seed=0, max_new_tokens=12, system="")


@pytest.fixture(autouse=True)
def runs(tmp_path, monkeypatch):
    folder = tmp_path / "runs"
    folder.mkdir()
    monkeypatch.setattr(ui_runs.SETTINGS, "runs_dir", folder)
    monkeypatch.setattr(jobs, "JOBS", jobs.JobManager())
    return folder


def save_adapter(folder: Path) -> Path:
    """A LoRA adapter on the demo model with random non-zero B: it changes the answers."""
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory):
    return save_adapter(tmp_path_factory.mktemp("adapter"))


def make_run(runs: Path, adapter_files: Path, name: str = "20250101-000000-demo", **config) -> Path:
    """A finished run folder as the trainer leaves it: adapter, config.yaml, status.json."""
    run = runs / name
    run.mkdir()
    for f in adapter_files.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    config = {"lora_r": 4, "lora_alpha": 8, **config}  # the adapter's shape (save_adapter)
    settings = TrainConfig(model=str(DEMO_MODEL_DIR), load_in_4bit=False, data="d.jsonl", output_dir=str(run),
                           max_steps=50, **config).to_dict()
    (run / "config.yaml").write_text(yaml.safe_dump(settings))
    (run / "status.json").write_text(json.dumps({"status": "finished", "step": 50, "total_steps": 50}))
    return run


def generate(source, typed=PROMPTS, prompt_file=None, **options):
    settings = {**GEN, **options}
    return list(rate.generate(source, "", typed, prompt_file, settings["max_prompts"], settings["n"],
                            settings["temperature"], settings["seed"], settings["max_new_tokens"],
                            settings["system"]))


def like(index, liked):
    return gr.LikeData(None, {"index": index, "value": "", "liked": liked})


# ---------------------------------------------------------------------- prompts
def test_prompts_come_from_every_data_format(tmp_path):
    kto, _ = rate.read_prompts(DEMO_SAMPLES["kto"])
    assert len(kto) == len({json.loads(line)["prompt"] for line in DEMO_SAMPLES["kto"].open()})  # each once
    assert kto[0] == {"prompt": "What is 29 + 49?", "row": json.loads(DEMO_SAMPLES["kto"].open().readline()),
                      "row_index": 0}
    assert kto[1]["row_index"] == 2  # its row: the answers are seeded as `kto_lite sample` seeds that row
    messages, _ = rate.read_prompts(DEMO_SAMPLES["messages"])
    assert messages[0]["prompt"] == [{"role": "user", "content": "What is 29 + 49?"}]  # the answer dropped
    paired, _ = rate.read_prompts(DEMO_SAMPLES["paired"])
    assert paired[0]["prompt"] == "What is 29 + 49?"
    csv = tmp_path / "questions.csv"
    csv.write_text("prompt,answer\nWhat is 1 + 1?,2\nWhat is 2 + 2?,4\n")
    prompts, columns = rate.read_prompts(csv)
    assert columns == ["prompt", "answer"] and prompts[1] == {"prompt": "What is 2 + 2?", "row": {
        "prompt": "What is 2 + 2?", "answer": "4"}, "row_index": 1}


def test_a_file_without_prompts_is_a_clear_error(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question": "hi"}\n')
    with pytest.raises(DataError, match="q.jsonl, line 1: no prompt: a prompt file needs a 'prompt' column"):
        rate.read_prompts(bad)
    bad.write_text('{"prompt": "hi"}\n{"prompt": 5}\n')
    state, info = rate.load_prompt_file(bad, "my questions.jsonl")
    assert state is None and "my questions.jsonl, line 2: 'prompt' must be text" in info and str(bad) not in info


def test_a_prompt_file_replaces_the_typed_prompts(runs, adapter_files):
    run = make_run(runs, adapter_files)
    state, info = rate.on_prompt_sample(next(k for k in ui_runs.sample_files() if k.startswith("demo_kto")))
    assert "distinct prompts" in info
    messages, status, batch = generate(str(run), prompt_file=state, max_prompts=2, n=1)[-1]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["What is 29 + 49?", "What is 32 - 12?"]
    assert rate.on_prompt_sample(rate.NO_FILE) == (None, "")  # back to the typed prompts, all of them
    messages, _, _ = generate(str(run), typed="What is 1 + 1?\nWhat is 2 + 2?\nWhat is 3 + 3?", max_prompts=2,
                              n=1)[-1]
    assert len([m for m in messages if m["role"] == "user"]) == 3  # the cap is for files only


# ---------------------------------------------------------------------- answers
def test_n_answers_per_prompt_from_the_runs_adapter_reproducibly(runs, adapter_files):
    run = make_run(runs, adapter_files)
    steps = generate(str(run))
    messages, status, batch = steps[-1]
    assert "2 / 2 prompts, 6 answers" in status and "1 / 2 prompts" in steps[-2][1]  # progress per prompt
    assert [m["role"] for m in messages] == ["user"] + ["assistant"] * 3 + ["user"] + ["assistant"] * 3
    assert [it["index"] for it in batch["items"]] == [1, 2, 3, 5, 6, 7]
    assert all(messages[it["index"]]["content"] == it["completion"] for it in batch["items"])
    model = chat.get_chat_model(str(run))  # the Chat tab's cached copy answered: adapter on
    assert model.has_adapter and chat._CACHE["key"] == (str(run), "")
    expected = model.sample([{"role": "user", "content": "What is 10 - 4?"}], 3, temperature=1.0,
                            max_new_tokens=12, seed=0, index=1)  # the second prompt
    assert [it["completion"] for it in batch["items"][3:]] == expected
    assert generate(str(run))[-1][2]["items"] == batch["items"]  # same seed, same answers
    assert generate(str(run), seed=5)[-1][2]["items"] != batch["items"]


def test_bad_generation_settings_are_explained(runs, adapter_files):
    run = make_run(runs, adapter_files)
    assert "Choose a run" in generate(None)[-1][1]
    assert "Type some prompts" in generate(str(run), typed="  \n")[-1][1]
    assert "greedy" in generate(str(run), temperature=0)[-1][1]
    assert generate(str(run), temperature=0, n=1)[-1][1].startswith("✓")


# ---------------------------------------------------------------------- rating and saving
def test_thumbs_then_save_write_the_chat_tabs_feedback_rows(runs, adapter_files):
    run = make_run(runs, adapter_files)
    _, _, batch = generate(str(run))[-1]
    batch, _ = rate.on_rate(batch, like(1, True))
    batch, _ = rate.on_rate(batch, like(2, False))
    batch, _ = rate.on_rate(batch, like(3, True))
    batch, text = rate.on_rate(batch, like(3, ""))  # the same thumb clicked again: un-rated
    assert "1 liked · 1 disliked · 4 unrated" in text
    text, batch = rate.save_ratings(batch)
    rows = [json.loads(line) for line in (run / "feedback.jsonl").read_text().splitlines()]
    assert rows == [{"prompt": "What is 2 + 3?", "completion": batch["items"][0]["completion"], "label": True},
                    {"prompt": "What is 2 + 3?", "completion": batch["items"][1]["completion"], "label": False}]
    assert "Added 2 rated answers" in text and f"`{run.name}/feedback.jsonl` (in the runs folder): 1 liked / 1 " \
        "disliked" in text
    label, path = next(iter(ui_runs.feedback_files().items()))  # the Data tab's feedback picker
    assert path == run / "feedback.jsonl" and "1 liked / 1 disliked" in label
    assert "Nothing new to save" in rate.save_ratings(batch)[0]  # saved once only
    _, warning = rate.on_rate(batch, like(1, False))
    assert "already in the feedback file" in warning and batch["items"][0]["label"] is True


def test_the_system_prompt_is_kept_so_training_sees_what_generation_saw(runs, adapter_files):
    run = make_run(runs, adapter_files)
    _, _, batch = generate(str(run), system="Answer with one equation.", n=1)[-1]
    batch, _ = rate.on_rate(batch, like(1, True))
    rate.save_ratings(batch)
    row = json.loads((run / "feedback.jsonl").read_text())
    assert row["prompt"] == [{"role": "system", "content": "Answer with one equation."},
                             {"role": "user", "content": "What is 2 + 3?"}]
    model = chat.get_chat_model(str(run))
    examples, _ = load_data(run / "feedback.jsonl")
    tokenized = tokenize(examples, model.tokenizer, max_length=None, max_prompt_length=None)[0]
    generated_from = model.prompt_ids([{"role": "user", "content": "What is 2 + 3?"}],
                                      system_prompt="Answer with one equation.")
    assert tokenized.prompt_ids == generated_from == encode_prompt(row["prompt"], model.tokenizer)


def test_a_judge_rates_the_answers_nobody_rated(runs, adapter_files):
    run = make_run(runs, adapter_files)
    questions = "What is 2 + 3?\nWhat is 7 - 7?"
    _, _, batch = generate(str(run), typed=questions, n=4)[-1]
    batch["items"][0]["completion"] = "2 + 3 = 5."  # make sure the judge sees both kinds
    batch["items"][1]["completion"] = "2 + 3 = 6."
    batch, _ = rate.on_rate(batch, like(2, True))  # a thumb wins over the judge: answer 1 stays 👍
    update, text, batch = rate.judge_answers(batch, f"python:{rate.DEMO_JUDGE}:judge", "", None)  # the preset
    expected = [True if i == 1 else demo_judge(it["prompt"], it["completion"]) for i, it in enumerate(batch["items"])]
    assert [it["label"] for it in batch["items"]] == expected
    assert [it["by"] for it in batch["items"]][:2] == ["judge", "you"]
    assert update["feedback_value"] == ["Like" if e else "Dislike" for e in expected]
    assert "rated by the judge" in text


def test_a_judge_that_cannot_rate_says_why(runs, adapter_files):
    run = make_run(runs, adapter_files)
    _, _, batch = generate(str(run), n=1)[-1]
    _, text, _ = rate.judge_answers(batch, "exact", "", None)  # typed prompts have no reference answer
    assert "could not rate 2 answer(s)" in text and "needs a reference answer" in text
    assert all(it["label"] is None for it in batch["items"])
    assert "unknown judge" in rate.judge_answers(batch, "telepathy", "", None)[1]
    assert "must be a number" in rate.judge_answers(batch, "exact", "", "high")[1]
    assert "threshold applies to python judges" in rate.judge_answers(batch, "exact", "", "0.5")[1]


def test_only_judges_that_can_rate_the_rows_are_offered(runs, adapter_files, tmp_path):
    run = make_run(runs, adapter_files)  # on the demo model
    typed = rate.judge_choices(None, str(run))  # typed prompts have no reference answer
    assert [v for _, v in typed] == [rate.BY_HAND, f"python:{rate.DEMO_JUDGE}:judge"]
    state, _ = rate.on_prompt_sample(next(k for k in rate._shipped_files() if k.startswith("smollm2_addition_held")))
    with_answers = rate.judge_choices(state, str(run))
    assert [v for _, v in with_answers][:4] == [rate.BY_HAND, "number", "exact", "contains"]
    assert "'answer' column" in with_answers[1][0]
    other = make_run(runs, adapter_files, "20250101-000001-other")
    settings = yaml.safe_load((other / "config.yaml").read_text())
    (other / "config.yaml").write_text(yaml.safe_dump({**settings, "model": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    assert [v for _, v in rate.judge_choices(None, str(other))] == [rate.BY_HAND]  # the demo judge is the demo's
    update = rate.refresh_judges(None, str(run), "", "number")  # a choice that no longer applies
    assert update["value"] == rate.BY_HAND


def test_by_hand_is_the_default_and_needs_no_judge(runs, adapter_files):
    run = make_run(runs, adapter_files)
    _, _, batch = generate(str(run), n=1)[-1]
    _, text, _ = rate.judge_answers(batch, rate.BY_HAND, "", None)
    assert "Choose a judge first" in text and all(it["label"] is None for it in batch["items"])


# ---------------------------------------------------------------------- the next round
@pytest.fixture
def started(monkeypatch):
    """The commands the app would start (none is run: the trainer is not under test here)."""
    calls = []
    monkeypatch.setattr(jobs.JOBS, "start", lambda argv, run, **kw: calls.append((argv, run)))
    return calls


def test_next_round_trains_from_the_runs_adapter_on_its_feedback(runs, adapter_files, started):
    run = make_run(runs, adapter_files, beta=0.3, learning_rate=4e-4)
    _, _, batch = generate(str(run))[-1]
    for index in (1, 2, 5):
        batch, _ = rate.on_rate(batch, like(index, index != 2))
    assert "not saved yet" in rate.train_next_round(str(run), "", batch, 2, "init_adapter")[0]
    _, batch = rate.save_ratings(batch)
    message, command = rate.train_next_round(str(run), "", batch, 2, "init_adapter")
    (argv, out), = started
    config = train_config(argv[3:])  # what `python -m kto_lite train` will parse
    assert argv[:3] == ["-m", "kto_lite", "train"] and f"--init_adapter {run}" in command
    assert config.init_adapter == str(run) and config.reference == "init_adapter"
    assert (config.model, config.lora_r, config.beta) == (str(DEMO_MODEL_DIR), 4, 0.3)  # the run's settings
    assert config.learning_rate == pytest.approx(2e-4)  # at half the run's rate, as the loop's later rounds
    # the weights follow the new feedback (1 liked / 2 disliked here), by TrainConfig's own `auto` rule:
    # the run's config.yaml holds the numbers its own data gave, and the command does not repeat them
    assert (config.desirable_weight, config.undesirable_weight) == ("auto", "auto") and "weight" not in command
    assert config.num_epochs == 2 and config.max_steps is None and Path(config.output_dir) == out
    assert out.parent == runs and out.name.endswith("-demo-round-2") and "demo-round-2" in message
    snapshot = Path(config.data)  # a copy: more ratings later do not change what this run trained on
    assert snapshot.parent == runs / "_data" and snapshot.read_text() == (run / "feedback.jsonl").read_text()
    assert [e.label for e in load_data(snapshot)[0]] == [True, False, True]


def test_round_numbers_follow_the_init_adapter_chain(runs, adapter_files, started):
    first = make_run(runs, adapter_files, "20250101-000000-demo")
    second = make_run(runs, adapter_files, "20250102-000000-demo-round-2", init_adapter=str(first))
    (second / "feedback.jsonl").write_text('{"prompt": "a", "completion": "b", "label": true}\n')
    rate.train_next_round(str(second), "", None, None, "base")
    (argv, out), = started
    assert out.name.endswith("-demo-round-3")
    assert train_config(argv[3:]).num_epochs == TrainConfig().num_epochs  # empty epochs: as the run


def test_the_next_round_keeps_watching_the_judged_success(runs, adapter_files, started, tmp_path):
    """A run trained with eval_prompts + judge: its next round judges the same held-out prompts the same way
    (and keeps the best checkpoint if the run did), so the rounds' numbers compare."""
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text('{"prompt": "What is 2 + 3?", "answer": "5"}\n')
    run = make_run(runs, adapter_files, eval_prompts=str(heldout), judge="number", keep_best=True,
                   early_stopping_patience=2, eval_steps=5)
    (run / "feedback.jsonl").write_text('{"prompt": "a", "completion": "b", "label": true}\n')
    rate.train_next_round(str(run), "", None, None, "init_adapter")
    (argv, _), = started
    config = train_config(argv[3:])
    assert (config.eval_prompts, config.judge, config.keep_best, config.early_stopping_patience,
            config.eval_steps) == (str(heldout), "number", True, 2, 5)


def test_next_round_needs_feedback_and_a_free_trainer(runs, adapter_files, started, monkeypatch):
    run = make_run(runs, adapter_files)
    assert "No feedback yet" in rate.train_next_round(str(run), "", None, None, "base")[0]
    (run / "feedback.jsonl").write_text('{"prompt": "a", "completion": "b", "label": true}\n')
    monkeypatch.setattr(jobs, "find_active", lambda runs_dir: run)
    assert "Busy" in rate.train_next_round(str(run), "", None, None, "base")[0]
    assert started == []


def test_the_base_model_starts_a_first_round(runs, started):
    chat.record_feedback(ui_runs.BASE, "", "What is 1 + 1?", "1 + 1 = 2.", True)
    rate.train_next_round(ui_runs.BASE, "", None, None, "init_adapter")
    (argv, out), = started
    config = train_config(argv[3:])
    assert config.init_adapter is None and config.reference == "base" and out.name.endswith("-demo-round-1")
    assert Path(config.data).read_text() == (runs / "_feedback" / "demo.jsonl").read_text()


@pytest.mark.slow
def test_the_next_round_really_trains_from_the_previous_adapter(runs):
    """Round 1 trained for real, rated with the demo judge in the app, round 2 started as the button does."""
    from safetensors.torch import load_file

    from kto_lite.training.recipe import train

    small = dict(model=str(DEMO_MODEL_DIR), load_in_4bit=False, max_steps=2, batch_size=2, max_length=48,
                 max_prompt_length=24, lora_r=4)
    first = train(TrainConfig(data=str(DEMO_SAMPLES["kto"]), output_dir=str(runs / "20250101-000000-demo"),
                              **small), show_progress=False)
    _, _, batch = generate(str(first), typed="What is 2 + 3?\nWhat is 9 - 4?", n=4)[-1]
    _, _, batch = rate.judge_answers(batch, f"python:{rate.DEMO_JUDGE}:judge", "", None)
    rate.save_ratings(batch)
    message, command = rate.train_next_round(str(first), "", batch, 1, "init_adapter")
    assert message.startswith("▶ Started"), message
    second = jobs.JOBS.run
    assert jobs.JOBS.proc.wait(timeout=600) == 0, jobs.log_tail(second)
    assert jobs.run_state(second).state == "finished"
    saved = yaml.safe_load((second / "config.yaml").read_text())
    assert saved["init_adapter"] == str(first) and saved["reference"] == "init_adapter"
    before, after = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
