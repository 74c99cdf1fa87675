"""The app's handlers as plain functions: form generation, data tab, job control, progress, chat, export.

No server and no model: training is a tiny fake trainer script, chat a fake model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import zipfile
from pathlib import Path

import gradio as gr
import pytest

from kto_lite.commands.train import train_config
from kto_lite.config import TrainConfig
from kto_lite.demo import DEMO_SAMPLES
from kto_lite.errors import ConfigError
from kto_lite.files import format_bytes
from ui import chat_handlers as ch
from ui import form, handlers, jobs

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
SKIP = gr.skip()

# Stands in for `python -m kto_lite train`: creates output_dir, writes status.json each step, and on
# SIGTERM writes "stopped", as the real trainer does.
FAKE_TRAINER = r"""
import json, os, signal, sys, time
out = sys.argv[sys.argv.index("--output_dir") + 1]
os.makedirs(out)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
def status(state, step):
    with open(os.path.join(out, "status.json"), "w") as f:
        json.dump({"status": state, "phase": "training", "step": step, "total_steps": 500,
                   "pid": os.getpid(), "message": ""}, f)
print("fake trainer started", flush=True)
for step in range(500):
    status("stopped" if stop else "running", step)
    if stop:
        time.sleep(0.5)  # the real trainer also takes a moment to exit after its final status
        sys.exit(0)
    time.sleep(0.02)
status("finished", 500)
"""


@pytest.fixture(autouse=True)
def runs(tmp_path, monkeypatch):
    """Every test gets its own runs folder and job manager."""
    folder = tmp_path / "runs"
    folder.mkdir()
    monkeypatch.setattr(handlers.SETTINGS, "runs_dir", folder)
    monkeypatch.setattr(jobs, "JOBS", jobs.JobManager())
    yield folder
    proc = jobs.JOBS.proc
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def make_run(runs: Path, name: str, status: str = "finished", metrics: list[dict] | None = None,
             adapter: bool = False, pid: int | None = None) -> Path:
    run = runs / name
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"status": status, "phase": status, "step": 3, "total_steps": 3,
                                                 "pid": pid, "message": ""}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics or []))
    if adapter:
        (run / "adapter_config.json").write_text("{}")
        (run / "adapter_model.safetensors").write_bytes(b"0")
    return run


def wait_until(condition, timeout: float = 20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


# ---------------------------------------------------------------------- the train form
def test_form_has_one_field_per_config_field_except_the_ones_the_app_sets():
    names = [s.name for s in form.field_specs()]
    expected = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in form.APP_SET]
    assert names == expected


def test_form_field_kinds_follow_the_config_types():
    specs = {s.name: s for s in form.field_specs()}
    assert specs["load_in_4bit"].kind == "checkbox"
    assert specs["lora_r"].kind == "integer" and specs["beta"].kind == "number"
    assert specs["loss_type"].kind == "dropdown" and "kto" in specs["loss_type"].choices
    assert specs["desirable_weight"].kind == "text" and specs["desirable_weight"].numeric
    assert specs["use_chat_template"].kind == "tristate" and specs["use_chat_template"].default == "auto"
    assert specs["max_steps"].optional and specs["max_steps"].default is None
    assert all(s.help for s in specs.values())


def test_default_form_builds_the_default_config():
    specs = form.field_specs()
    config = form.build_config(specs, [s.default for s in specs], data="d.jsonl", output_dir="runs/x")
    assert config == TrainConfig(data="d.jsonl", output_dir="runs/x")
    assert form.train_argv(config) == ["-m", "kto_lite", "train", "--data", "d.jsonl", "--output_dir", "runs/x"]


def test_form_values_survive_the_command_line():
    specs = form.field_specs()
    edits = {"model": "org/my model", "desirable_weight": "auto", "undesirable_weight": "0.5",
             "lora_target_modules": "q_proj, v_proj", "use_chat_template": "false", "max_steps": 3.0,
             "learning_rate": 2e-5}
    values = [edits.get(s.name, s.default) for s in specs]
    config = form.build_config(specs, values, data="my data.jsonl", output_dir="runs/x")
    assert config.desirable_weight == "auto" and config.undesirable_weight == 0.5
    assert config.lora_target_modules == ["q_proj", "v_proj"] and config.use_chat_template is False
    argv = form.train_argv(config)
    assert train_config(argv[3:]) == config  # what the subprocess will parse
    assert form.config_to_values(config, specs)[[s.name for s in specs].index("max_steps")] == 3


def test_optional_number_zero_means_not_set():
    specs = form.field_specs()
    values = [0 if s.name == "max_steps" else s.default for s in specs]
    assert form.build_config(specs, values, data=None, output_dir="x").max_steps is None


def test_bad_form_value_is_a_config_error():
    specs = form.field_specs()
    values = [-1.0 if s.name == "beta" else s.default for s in specs]
    with pytest.raises(ConfigError, match="beta"):
        form.build_config(specs, values, data=None, output_dir="x")


# ---------------------------------------------------------------------- Data tab
def test_sample_is_described_and_becomes_the_training_data():
    name = next(k for k in handlers.sample_files() if k.startswith("demo_kto"))
    *outputs, source = handlers.on_sample(name)
    summary, preview, problems, _, mapping, *_, state = outputs
    assert "prompt / completion / label" in summary
    assert mapping["visible"] is False
    assert state["path"] == str(DEMO_SAMPLES["kto"]) and len(preview) == min(state["rows"], handlers.PREVIEW_ROWS)
    assert state["n_desirable"] + state["n_undesirable"] == state["rows"]
    assert "desirable" in handlers.data_banner(state) and source["path"] == state["path"]


def test_upload_is_copied_under_a_content_name(tmp_path, runs):
    upload = tmp_path / "uploads" / "..evil name;rm -rf.jsonl"
    upload.parent.mkdir()
    upload.write_text(DEMO_SAMPLES["kto"].read_text())
    *outputs, source = handlers.on_upload(str(upload))
    staged = Path(outputs[-1]["path"])
    assert staged.parent == runs / "_data" and staged.suffix == ".jsonl"
    assert "evil" not in staged.name and staged.read_bytes() == upload.read_bytes()


def test_unknown_columns_offer_mapping_and_the_mapping_trains(tmp_path, runs):
    path = tmp_path / "ratings.csv"
    path.write_text("question,answer,rating\nhi,hello,good\nhi,go away,bad\nbye,see you,good\n")
    *outputs, source = handlers.on_upload(str(path))
    problems, mapping, boxes, state = outputs[2], outputs[4], outputs[5:11], outputs[11]
    assert state is None and mapping["visible"] is True and "Cannot use this file" in problems
    assert boxes[0]["choices"] == [handlers.NOT_IN_FILE, "question", "answer", "rating"]
    targets = {"prompt": "question", "completion": "answer", "label": "rating"}
    mapped = handlers.on_map_columns(source, *[targets.get(t, handlers.NOT_IN_FILE) for t in handlers.MAP_TARGETS])
    state = mapped[-1]
    assert state["rows"] == 3 and state["n_desirable"] == 2
    assert Path(state["path"]).parent == runs / "_data"
    from kto_lite.data import load_data

    examples, _ = load_data(state["path"])  # what the trainer will read
    assert [(e.prompt, e.completion, e.label) for e in examples][1] == ("hi", "go away", False)


def test_bad_label_names_the_row_without_offering_mapping(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b", "label": true}\n{"prompt": "a", "completion": "c", '
                    '"label": "maybe"}\n')
    outputs = handlers.on_upload(str(path))
    assert "line 2" in outputs[2] and "maybe" in outputs[2]
    assert outputs[4]["visible"] is False and outputs[11] is None


def test_an_upload_is_named_by_its_own_name_in_errors_and_the_report(tmp_path, runs):
    bad = tmp_path / "my answers.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b", "label": true}\n{"prompt": "a", "completion": "c", '
                   '"label": "maybe"}\n')
    problems = handlers.on_upload(str(bad))[2]
    assert "my answers.jsonl, line 2" in problems and "_data" not in problems
    good = tmp_path / "good.jsonl"
    good.write_text(DEMO_SAMPLES["kto"].read_text())
    report = handlers.on_upload(str(good))[3]
    assert report.startswith("file") and "good.jsonl" in report.splitlines()[0] and "_data" not in report


def test_long_errors_are_shown_whole_and_wrapped(tmp_path):
    rows = [{"prompt": f"question {i}", "completion": "answer", "label": f"a label nobody knows, number {i} " * 2}
            for i in range(30)]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = handlers.on_upload(str(path))[2]
    assert "```" not in problems  # a code block cuts lines longer than the column instead of wrapping them
    items = [line for line in problems.splitlines() if line.startswith("- ")]
    assert len(items) == 21 and "and 10 more lines with problems" in items[-1]  # 20 errors, then the count
    assert all("labels.jsonl, line" in item for item in items[:20])
    assert "number 19 a label nobody knows, number 19" in items[19]
    assert "labels.jsonl, line 1: 'label': unknown label 'a label nobody knows, number 0" in items[0]  # no entities


def test_a_near_even_label_split_is_not_a_problem(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": "c", "label": i < 49} for i in range(100)]
    path = tmp_path / "split.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary, _, problems, *_ = handlers.on_upload(str(path))
    assert problems == "**Problems:**\nNo problems found."
    assert "desirable_weight **1**, undesirable_weight **0.961**" in summary  # still told, as information
    rows = [{"prompt": f"p{i}", "completion": "c", "label": True} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "Only desirable examples" in handlers.on_upload(str(path))[2]  # one-sided data stays a problem


def test_the_duplicate_list_says_how_many_were_left_out(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": "c", "label": i % 2 == 0} for i in range(50)] * 2
    path = tmp_path / "twice.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = handlers.on_upload(str(path))[2]
    assert "50 example(s) repeat an earlier one exactly" in problems and "1, 51; 2, 52" in problems
    assert "... and 45 more group(s)" in problems


def test_feedback_files_are_offered_as_data(runs):
    run = make_run(runs, "20250101-000000-a", adapter=True)
    ch.record_feedback(str(run), "", "What is 2 + 2?", "4", True)
    ch.record_feedback(str(run), "", "What is 2 + 3?", "6", False)
    (label, path), = handlers.feedback_files().items()
    assert "1 liked / 1 disliked" in label and path == run / "feedback.jsonl"
    state = handlers.on_feedback_file(label)[-2]
    assert state["rows"] == 2 and Path(state["path"]).parent == runs / "_data"


def test_the_banner_names_the_weights_auto_uses():
    state = {"name": "x.jsonl", "rows": 30, "n_desirable": 10, "n_undesirable": 20, "weights": [1.0, 0.667]}
    assert "weights `auto` use 1 / 0.667" in handlers.data_banner(state)
    assert "No training data" in handlers.data_banner(None)


# ---------------------------------------------------------------------- Train tab
def _defaults():
    return [s.default for s in handlers.SPECS]


def test_recipe_shows_yaml_command_and_memory():
    state = {"path": str(DEMO_SAMPLES["kto"]), "name": "demo", "rows": 1, "n_desirable": 1, "n_undesirable": 0,
             "weights": [1.0, 1.0]}
    yaml_text, command, memory = handlers.show_recipe(state, "my run", *_defaults())
    assert f"data: {DEMO_SAMPLES['kto']}" in yaml_text and "-my-run" in yaml_text
    assert command.startswith("python -m kto_lite train --data ") and "--output_dir" in command
    assert "Estimated GPU memory" in memory and "total" in memory


def test_recipe_reports_a_bad_value():
    values = [0 if s.name == "batch_size" else s.default for s in handlers.SPECS]
    _, _, message = handlers.show_recipe(None, "", *values)
    assert "batch_size" in message


def test_start_warns_when_the_estimate_exceeds_the_gpu(monkeypatch):
    config = TrainConfig(data="d.jsonl", output_dir="x")
    monkeypatch.setattr(handlers, "_gpu_memory_gb", lambda: None)
    assert handlers.fit_warning(config) == ""  # no GPU: nothing to compare with
    monkeypatch.setattr(handlers, "_gpu_memory_gb", lambda: 0.01)
    assert "more than this GPU's 0.0 GiB" in handlers.fit_warning(config)


def test_start_needs_data():
    message, _ = handlers.start_training(None, "", *_defaults())
    assert "Data" in message and jobs.JOBS.proc is None


def test_one_job_at_a_time_and_stop_is_graceful(runs):
    run = runs / "20250101-000000-fake"
    jobs.JOBS.start(["-c", FAKE_TRAINER, "--output_dir", str(run)], run)
    assert jobs.find_active(runs) == run  # known before status.json exists
    wait_until(lambda: jobs.run_state(run).state == "running")
    with pytest.raises(RuntimeError, match="already running"):
        jobs.JOBS.start(["-c", "pass"], runs / "other")
    state = {"path": "x.jsonl", "name": "x", "rows": 1, "n_desirable": 1, "n_undesirable": 0, "weights": [1, 1]}
    assert "Busy" in handlers.start_training(state, "", *_defaults())[0]

    assert "Stop requested" in handlers.stop_training(handlers.LATEST)
    wait_until(lambda: jobs.run_state(run).state == "stopped")
    assert jobs.find_active(runs) is None  # final status written: no longer busy, though still exiting
    assert "fake trainer started" in jobs.log_tail(run)
    assert (run / "train.log").is_file() and not list((runs / ".logs").iterdir())  # the log moved in
    jobs.JOBS.start(["-c", "pass"], runs / "next")  # waits for the exiting one, then starts


def test_a_command_that_fails_before_starting_leaves_a_failed_run(runs):
    run = runs / "20250101-000000-bad"
    jobs.JOBS.start(["-c", "import sys; print('error: no such field'); sys.exit(2)"], run)
    jobs.JOBS.proc.wait(10)
    state = jobs.run_state(run)
    assert state.state == "failed" and "code 2" in state.message
    assert "no such field" in jobs.log_tail(run)


def test_resume_needs_a_checkpoint(runs):
    make_run(runs, "20250101-000000-a", status="stopped")
    assert "no checkpoint" in handlers.resume_training(handlers.LATEST)
    make_run(runs, "20250101-000001-b", status="finished")
    assert "finished" in handlers.resume_training(str(runs / "20250101-000001-b"))


def test_resume_reuses_the_run_config(runs):
    run = make_run(runs, "20250101-000000-a", status="stopped")
    assert form.resume_argv(run) == ["-m", "kto_lite", "train", str(run / "config.yaml"), "--output_dir",
                                     str(run), "--resume_from_checkpoint", "true"]


def test_running_status_with_a_dead_process_is_failed(runs):
    run = make_run(runs, "20250101-000000-a", status="running", pid=2**22 + 12345)
    assert jobs.run_state(run).state == "failed"
    assert jobs.find_active(runs) is None


def test_a_live_run_started_elsewhere_is_picked_up(runs):
    run = make_run(runs, "20250101-000000-a", status="running", pid=os.getpid())  # alive: this process
    make_run(runs, "20250101-000001-b", status="finished")
    assert handlers.resolve_run(handlers.LATEST) == run


def test_progress_reads_the_run_folder_and_skips_when_nothing_changed(runs):
    rows = [{"step": s, "loss": 0.5 - s / 100, "kl": 0.1, "rewards/chosen": 0.1, "rewards/rejected": -0.1,
             "rewards/margins": 0.2, "learning_rate": 1e-5} for s in (1, 2, 3)]
    make_run(runs, "20250101-000000-a", metrics=rows)
    status, log, loss, rewards, kl, lr, dropdown, signature = handlers.progress(handlers.LATEST, None)
    assert "finished" in status and "step 3 / 3" in status
    assert list(loss.dropna()["value"]) == [0.49, 0.48, 0.47]
    assert set(rewards["series"]) == {"desirable", "undesirable", "margin"}
    assert [c[1] for c in dropdown["choices"]] == [handlers.LATEST, str(runs / "20250101-000000-a")]
    again = handlers.progress(handlers.LATEST, signature)
    assert again[:7] == (SKIP,) * 7


def test_progress_before_any_run_is_an_empty_state():
    status, log, *plots, _, _ = handlers.progress(handlers.LATEST, None)
    assert "No runs yet" in status and plots == [None] * 4


def test_plots_know_the_eval_series_from_the_first_step(runs):
    run = make_run(runs, "20250101-000000-a", metrics=[{"step": 1, "loss": 0.5}])
    (run / "config.yaml").write_text("eval_fraction: 0.1\n")
    assert set(jobs.metric_frames(run)["loss"]["series"]) == {"train", "eval"}


def test_run_folders_are_named_by_the_app(runs):
    first = jobs.new_run_dir(runs, "My Run: ../../etc")
    assert first.parent == runs and first.name.endswith("-my-run-etc")
    first.mkdir()
    assert jobs.new_run_dir(runs, "My Run: ../../etc") != first


def test_log_tail_keeps_the_last_state_of_progress_bars(runs):
    run = make_run(runs, "20250101-000000-a")
    (run / "train.log").write_text("start\nKTO 1/3\rKTO 2/3\rKTO 3/3\ndone\n")
    assert jobs.log_tail(run) == "start\nKTO 3/3\ndone"


def test_eta_from_the_speed_seen(runs):
    run = make_run(runs, "20250101-000000-a")
    state = jobs.RunState("running", "training", step=10, total_steps=30)
    assert jobs.eta_seconds(run, state, now=100.0) is None  # first sight
    state.step = 20
    assert jobs.eta_seconds(run, state, now=110.0) == pytest.approx(10.0)


# ---------------------------------------------------------------------- Chat tab
class FakeChatModel:
    """Streams a fixed reply word by word; honours stop_event like kto_lite.feedback.chat.ChatModel."""

    has_adapter = True

    def __init__(self):
        self.calls = []
        self.last_stats = {"new_tokens": 3, "seconds": 0.1}

    def stream(self, messages, *, use_adapter=True, stop_event=None, **options):
        self.calls.append((messages, use_adapter, options))
        text = ""
        for word in ("tuned" if use_adapter else "base", "says", "hi"):
            if stop_event is not None and stop_event.is_set():
                return
            text += word + " "
            yield text.strip()


@pytest.fixture
def fake_model(monkeypatch):
    model = FakeChatModel()
    monkeypatch.setattr(ch, "get_chat_model", lambda source, base_model=None: model)
    return model


def _chat(source, side_by_side=False, message="Hello", tuned=(), base=(), turns=None, system="be brief"):
    return list(ch.chat_send(message, list(tuned), list(base), source, "", side_by_side, system, 0.0, 0.9, 16,
                             turns))


def test_chat_streams_the_tuned_reply(fake_model, runs):
    run = make_run(runs, "20250101-000000-a", adapter=True)
    steps = _chat(str(run))
    box, tuned, base, status, turns = steps[-1]
    assert tuned[-1] == {"role": "assistant", "content": "tuned says hi"} and base == []
    assert turns["tuned"][1]["system"] == "be brief"  # what conditioned the reply at index 1
    assert "3 tokens" in status and steps[0][0] == ""
    messages, use_adapter, options = fake_model.calls[0]
    assert messages == [{"role": "user", "content": "Hello"}] and use_adapter
    assert options["system_prompt"] == "be brief" and options["max_new_tokens"] == 16


def test_side_by_side_answers_with_adapters_off_then_on_with_one_seed(fake_model, runs):
    run = make_run(runs, "20250101-000000-a", adapter=True)
    _, tuned, base, _, _ = _chat(str(run), side_by_side=True)[-1]
    assert base[-1]["content"] == "base says hi" and tuned[-1]["content"] == "tuned says hi"
    (_, first, opts1), (_, second, opts2) = fake_model.calls
    assert (first, second) == (False, True) and opts1["seed"] == opts2["seed"]


def test_stop_ends_the_reply(fake_model, runs):
    run = make_run(runs, "20250101-000000-a", adapter=True)
    replies = ch.chat_send("Hello", [], [], str(run), "", False, "", 0.7, 0.9, 16)
    next(replies), next(replies)  # loading, first word
    ch.stop_chat()
    *_, (box, tuned, base, status, _) = list(replies)
    assert tuned[-1]["content"] == "tuned" and "Stopped" in status


def test_thumbs_on_a_reply_append_a_feedback_row(runs):
    run = make_run(runs, "20250101-000000-a", adapter=True)
    history = [{"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "5"}]}]
    counts = ch.on_like(history, str(run), "", None, "tuned",
                        gr.LikeData(None, {"index": 1, "value": "5", "liked": False}))
    assert "0 liked / 1 disliked" in counts
    row = json.loads((run / "feedback.jsonl").read_text())
    assert row == {"prompt": "What is 2 + 2?", "completion": "5", "label": False}
    like = gr.LikeData(None, {"index": 0, "value": "x", "liked": True})
    assert ch.on_like(history, str(run), "", None, "tuned", like) == SKIP


def _like(index, liked=True):
    return gr.LikeData(None, {"index": index, "value": "", "liked": liked})


def test_feedback_keeps_the_system_prompt_that_conditioned_the_reply(fake_model, runs):
    from kto_lite.data import encode_prompt, load_data, tokenize
    from kto_lite.demo import DEMO_MODEL_DIR
    from kto_lite.model import load_tokenizer

    run = make_run(runs, "20250101-000000-a", adapter=True)
    _, tuned, _, _, turns = _chat(str(run), system="Answer in one sentence.")[-1]
    _, tuned, _, _, turns = _chat(str(run), message="Again", tuned=tuned, turns=turns, system="")[-1]
    ch.on_like(tuned, str(run), "", turns, "tuned", _like(1))  # the reply made with the system prompt
    ch.on_like(tuned, str(run), "", turns, "tuned", _like(3, False))  # the one made without
    with_system, without = [json.loads(line) for line in (run / "feedback.jsonl").read_text().splitlines()]
    system = {"role": "system", "content": "Answer in one sentence."}
    assert with_system["prompt"] == [system, {"role": "user", "content": "Hello"}]
    assert without["prompt"][0]["role"] == "user" and len(without["prompt"]) == 3
    # training sees the ids generation saw: the system prompt is in the prompt tokens
    tokenizer = load_tokenizer(str(DEMO_MODEL_DIR))
    examples, _ = load_data(run / "feedback.jsonl")
    first = tokenize(examples, tokenizer, max_length=None, max_prompt_length=None)[0]
    assert first.prompt_ids == encode_prompt(with_system["prompt"], tokenizer)
    assert "Answer in one sentence." in tokenizer.decode(first.prompt_ids)


def test_side_by_side_turned_on_mid_conversation_answers_the_earlier_messages(fake_model, runs):
    run = make_run(runs, "20250101-000000-a", adapter=True)
    _, tuned, base, _, turns = _chat(str(run), message="Hello")[-1]
    _, tuned, base, _, turns = _chat(str(run), message="Again", tuned=tuned, base=base, turns=turns)[-1]
    assert base == []
    tuned_calls = list(fake_model.calls)
    steps = list(ch.base_column(str(run), True, tuned, base, turns, "", 0.0, 0.9, 16))
    base, status, base_turns = steps[-1]
    assert "earlier message" in steps[0][1] and "tokens in" in status
    assert [m["content"] for m in base] == ["Hello", "base says hi", "Again", "base says hi"]
    replayed = fake_model.calls[len(tuned_calls):]
    assert [use_adapter for _, use_adapter, _ in replayed] == [False, False]
    # each earlier message is answered with the seed and system prompt of the tuned reply to it, over the
    # base's own conversation: what the column would hold had side by side been on from the start
    assert [o["seed"] for *_, o in replayed] == [o["seed"] for *_, o in tuned_calls]
    assert replayed[1][0] == base[:3] and base_turns["base"] == {1: turns["tuned"][1], 3: turns["tuned"][3]}
    again = list(ch.base_column(str(run), True, tuned, base, base_turns, "", 0.0, 0.9, 16))
    assert len(again) == 1 and again[0][0]["value"] == base  # nothing missing: nothing generated
    assert ch.base_column(str(run), False, tuned, base, turns, "", 0, 0.9, 16).__next__()[0]["visible"] is False


def test_base_model_feedback_goes_to_the_runs_feedback_folder(runs):
    assert ch.feedback_path(ch.BASE, "") == runs / "_feedback" / "demo.jsonl"
    assert ch.feedback_path(ch.BASE, "Qwen/Qwen2.5-0.5B-Instruct") == runs / "_feedback" / "qwen2-5-0-5b-instruct.jsonl"


def test_chat_choices_are_runs_with_an_adapter_then_the_base(runs):
    with_adapter = make_run(runs, "20250101-000000-a", adapter=True)
    make_run(runs, "20250101-000001-b")
    assert [v for _, v in ch.chat_choices()] == [str(with_adapter), ch.BASE]


def test_a_path_outside_the_runs_folder_is_refused(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "status.json").write_text("{}")
    with pytest.raises(gr.Error):
        ch.feedback_path(str(outside))


# ---------------------------------------------------------------------- Export tab
def test_zip_and_snippet(runs):
    run = make_run(runs, "20250101-000000-a", adapter=True)
    (run / "config.yaml").write_text("model: null\n")
    path, message = ch.zip_run(str(run))
    assert Path(path).name == f"{run.name}-adapter.zip" and format_bytes(Path(path).stat().st_size) in message
    assert f"{run.name}/adapter_model.safetensors" in zipfile.ZipFile(path).namelist()
    assert "PeftModel.from_pretrained" in ch.load_code(str(run), "adapter")
    assert "merge the adapter first" in ch.load_code(str(run), "merged")


def test_merge_notice_gives_the_memory_needed(runs):
    run = make_run(runs, "20250101-000000-a", adapter=True)
    (run / "config.yaml").write_text("model: null\n")
    notice = ch.merge_notice(str(run))
    assert "of RAM" in notice and "unquantized" in notice


def test_app_builds_with_one_tab_per_concern():
    from ui.app import build_demo

    demo = build_demo()
    tabs = [b.label for b in demo.blocks.values() if isinstance(b, gr.Tab)]
    assert tabs == ["Data", "Train", "Chat", "Rate", "Export"]
    assert sys.modules["ui.app"].demo is not None


# ---------------------------------------------------------------------- Export tab: merge, GGUF, Hub (real exports)
def _final(generator):
    """The last value a streaming handler yields."""
    import collections

    return collections.deque(generator, maxlen=1)[0]


@pytest.fixture
def demo_adapter_run(runs, request):
    """A finished run on the demo model with a real (random) LoRA adapter; with its data file when the test
    parametrizes it indirectly with True (the export then measures the merges' drift: slower)."""
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kto_lite.demo import DEMO_MODEL_DIR

    run = make_run(runs, "20250101-000000-demo")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.save_pretrained(run)
    AutoTokenizer.from_pretrained(DEMO_MODEL_DIR).save_pretrained(run)
    data = str(next(iter(DEMO_SAMPLES.values()))) if getattr(request, "param", False) else None
    (run / "config.yaml").write_text(yaml.safe_dump({"model": None, "load_in_4bit": True, "data": data}))
    return run


@pytest.mark.parametrize("demo_adapter_run", [True], indirect=True, ids=["with-data"])
def test_merge_then_the_snippet_radio_follows_and_sizes_are_readable(demo_adapter_run):
    assert ch.snippet_after_merge(str(demo_adapter_run)) == SKIP  # nothing merged yet: the radio stays
    log, snippet = _final(ch.merge_run(str(demo_adapter_run), "quantized"))
    assert (demo_adapter_run / "merged" / "config.json").is_file(), log["value"]
    assert "of RAM" in log["value"] and "0.0 GiB" not in log["value"] and "mean |Δ log p|" in log["value"]
    assert "AutoModelForCausalLM.from_pretrained" in snippet and "merged" in snippet
    assert ch.snippet_after_merge(str(demo_adapter_run)) == "merged"  # the radio says what the snippet shows
    assert ch.load_code(str(demo_adapter_run), "merged") == snippet
    log, _ = _final(ch.merge_run(str(demo_adapter_run), "full"))
    assert (demo_adapter_run / "merged-full" / "config.json").is_file(), log["value"]


def test_gguf_export_gives_the_file_the_modelfile_and_the_commands(demo_adapter_run):
    log, files, commands = _final(ch.gguf_run(str(demo_adapter_run), "q8_0", "quantized"))
    names = sorted(Path(f).name for f in files)
    assert names == ["20250101-000000-demo-quantized-q8_0.Modelfile", "20250101-000000-demo-quantized-q8_0.gguf"], \
        log["value"]
    assert "llama-cli -m" in commands and "ollama create 20250101-000000-demo -f" in commands
    log, files, commands = _final(ch.gguf_run(str(demo_adapter_run), "lora"))
    assert [Path(f).name for f in files] == ["20250101-000000-demo-lora.gguf"] and "--base_gguf" in log["value"]


def test_hub_push_without_a_token_explains_and_with_one_links(demo_adapter_run, monkeypatch, tmp_path):
    from test_hub import stand_in_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    log, message = _final(ch.push_run(str(demo_adapter_run), "me/demo"))
    assert "HF_TOKEN" in log["value"] and "failed" in message
    with stand_in_hub(monkeypatch) as calls:
        monkeypatch.delenv("HF_HUB_OFFLINE")  # the export runs in a subprocess: offline comes from the environment
        log, message = _final(ch.push_run(str(demo_adapter_run), "me/demo", False))
    assert "Uploaded: [http://127.0.0.1" in message, log["value"]
    assert any(path == "/api/repos/create" for _, path, *_ in calls)
    assert (demo_adapter_run / "README.md").read_text().startswith("---")
