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

from kto_lite import presets
from kto_lite.commands.train import train_config
from kto_lite.config import TrainConfig
from kto_lite.demo import DEMO_SAMPLES
from kto_lite.errors import ConfigError
from kto_lite.files import format_bytes
from ui import form, jobs, welcome
from ui import runs as ui_runs
from ui.tabs import chat, data, export, train

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
    monkeypatch.setattr(ui_runs.SETTINGS, "runs_dir", folder)
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
    config = form.build_config(specs, values, data="my data.jsonl", output_dir="runs/x",
                               columns={"my question": "prompt", "réponse": "completion"})
    assert config.desirable_weight == "auto" and config.undesirable_weight == 0.5
    assert config.lora_target_modules == ["q_proj", "v_proj"] and config.use_chat_template is False
    argv = form.train_argv(config)
    assert train_config(argv[3:]) == config  # what the subprocess will parse
    assert form.config_to_values(config, specs)[[s.name for s in specs].index("max_steps")] == 3


def test_optional_number_zero_means_not_set():
    specs = form.field_specs()
    values = [0 if s.name == "max_steps" else s.default for s in specs]
    assert form.build_config(specs, values, data=None, output_dir="x").max_steps is None


def test_unset_numbers_are_empty_text_and_typed_ones_are_read():
    specs = form.field_specs()
    typed = {"learning_rate": "", "max_steps": " 12 ", "beta": "0.2"}
    config = form.build_config(specs, [typed.get(s.name, s.default) for s in specs], data=None, output_dir="x")
    assert (config.learning_rate, config.max_steps, config.beta) == (None, 12, 0.2)
    for bad, why in (("fast", "'fast' is not a number"), ("2.5", "not a whole number")):
        values = [bad if s.name == "max_steps" else s.default for s in specs]
        with pytest.raises(ConfigError, match=f"max_steps: .*{why}"):
            form.build_config(specs, values, data=None, output_dir="x")


def test_the_placeholder_of_an_unset_number_is_the_default_it_will_use():
    assert train.DEFAULT_PLACEHOLDERS["learning_rate"] == "empty: 0.001"  # the form starts on the demo model
    assert train.DEFAULT_PLACEHOLDERS["max_steps"] == "empty: not set"
    values = [presets.SMOLLM2 if s.name == "model" else s.default for s in train.SPECS]
    shown = dict(zip(train.OPTIONAL, train.placeholders(*values), strict=True))
    assert shown["learning_rate"]["placeholder"] == "empty: 0.0002" and shown["beta"]["placeholder"] == "empty: 0.1"
    assert shown["num_epochs"]["placeholder"] == "empty: 1"


def test_bad_form_value_is_a_config_error():
    specs = form.field_specs()
    values = [-1.0 if s.name == "beta" else s.default for s in specs]
    with pytest.raises(ConfigError, match="beta"):
        form.build_config(specs, values, data=None, output_dir="x")


# ---------------------------------------------------------------------- Data tab
def test_sample_is_described_and_becomes_the_training_data():
    name = next(k for k in ui_runs.sample_files() if k.startswith("demo_kto"))
    *outputs, source = data.on_sample(name)
    summary, preview, problems, _, mapping, *_, state = outputs
    assert "prompt / completion / label" in summary
    assert mapping["visible"] is False
    assert state["path"] == str(DEMO_SAMPLES["kto"]) and len(preview) == min(state["rows"], data.PREVIEW_ROWS)
    assert state["n_desirable"] + state["n_undesirable"] == state["rows"]
    assert "desirable" in train.data_banner(state) and source["path"] == state["path"]


def test_upload_is_copied_under_a_content_name(tmp_path, runs):
    upload = tmp_path / "uploads" / "..evil name;rm -rf.jsonl"
    upload.parent.mkdir()
    upload.write_text(DEMO_SAMPLES["kto"].read_text())
    *outputs, source = data.on_upload(str(upload))
    staged = Path(outputs[-1]["path"])
    assert staged.parent == runs / "_data" and staged.suffix == ".jsonl"
    assert "evil" not in staged.name and staged.read_bytes() == upload.read_bytes()


def test_unknown_columns_offer_mapping_and_the_mapping_trains(tmp_path, runs):
    path = tmp_path / "ratings.csv"
    path.write_text("question,answer,rating\nhi,hello,good\nhi,go away,bad\nbye,see you,good\n")
    *outputs, source = data.on_upload(str(path))
    problems, mapping, boxes, state = outputs[2], outputs[4], outputs[5:11], outputs[11]
    assert state is None and mapping["visible"] is True and "Cannot use this file" in problems
    assert boxes[0]["choices"] == [data.NOT_IN_FILE, "question", "answer", "rating"]
    filled = {t: box["value"] for t, box in zip(data.MAP_TARGETS, boxes, strict=True)}
    assert filled == {"prompt": "question", "completion": "answer", "label": "rating", "messages": data.NOT_IN_FILE,
                      "chosen": data.NOT_IN_FILE, "rejected": data.NOT_IN_FILE}  # pre-filled from the names
    targets = {"prompt": "question", "completion": "answer", "label": "rating"}
    mapped = data.on_map_columns(source, *[targets.get(t, data.NOT_IN_FILE) for t in data.MAP_TARGETS])
    state = mapped[-1]
    assert state["rows"] == 3 and state["n_desirable"] == 2
    assert state["path"] == source["path"] and Path(state["path"]).parent == runs / "_data"  # the upload itself
    assert state["columns"] == {"question": "prompt", "answer": "completion", "rating": "label"}
    from kto_lite.data import load_data

    values = form.config_to_values(TrainConfig(), train.SPECS)
    config = train._config(state, values, runs / "r")  # the run's `columns` field: the mapping, as the CLI's
    assert config.data == state["path"] and config.columns == state["columns"]
    examples, _ = load_data(config.data, config.columns)  # what the trainer will read
    assert [(e.prompt, e.completion, e.label) for e in examples][1] == ("hi", "go away", False)
    recipe_yaml, command, _ = train.show_recipe(state, "", *values)
    assert "columns:" in recipe_yaml and "--columns" in command


def test_bad_label_names_the_row_without_offering_mapping(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b", "label": true}\n{"prompt": "a", "completion": "c", '
                    '"label": "maybe"}\n')
    outputs = data.on_upload(str(path))
    assert "line 2" in outputs[2] and "maybe" in outputs[2]
    assert outputs[4]["visible"] is False and outputs[11] is None


def test_an_upload_is_named_by_its_own_name_in_errors_and_the_report(tmp_path, runs):
    bad = tmp_path / "my answers.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b", "label": true}\n{"prompt": "a", "completion": "c", '
                   '"label": "maybe"}\n')
    problems = data.on_upload(str(bad))[2]
    assert "my answers.jsonl, line 2" in problems and "_data" not in problems
    good = tmp_path / "good.jsonl"
    good.write_text(DEMO_SAMPLES["kto"].read_text())
    report = data.on_upload(str(good))[3]
    assert report.startswith("file") and "good.jsonl" in report.splitlines()[0] and "_data" not in report


def test_long_errors_are_shown_whole_and_wrapped(tmp_path):
    rows = [{"prompt": f"question {i}", "completion": "answer", "label": f"a label nobody knows, number {i} " * 2}
            for i in range(30)]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = data.on_upload(str(path))[2]
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
    summary, _, problems, *_ = data.on_upload(str(path))
    assert problems == "**Problems:**\nNo problems found."
    assert "desirable_weight **1**, undesirable_weight **0.961**" in summary  # still told, as information
    rows = [{"prompt": f"p{i}", "completion": "c", "label": True} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "Only desirable examples" in data.on_upload(str(path))[2]  # one-sided data stays a problem


def test_the_duplicate_list_says_how_many_were_left_out(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": "c", "label": i % 2 == 0} for i in range(50)] * 2
    path = tmp_path / "twice.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = data.on_upload(str(path))[2]
    assert "50 example(s) repeat an earlier one exactly" in problems and "1, 51; 2, 52" in problems
    assert "... and 45 more group(s)" in problems


def test_feedback_files_are_offered_as_data(runs):
    run = make_run(runs, "20250101-000000-a", adapter=True)
    chat.record_feedback(str(run), "", "What is 2 + 2?", "4", True)
    chat.record_feedback(str(run), "", "What is 2 + 3?", "6", False)
    (label, path), = ui_runs.feedback_files().items()
    assert "1 liked / 1 disliked" in label and path == run / "feedback.jsonl"
    state = data.on_feedback_file(label)[-2]
    assert state["rows"] == 2 and Path(state["path"]).parent == runs / "_data"


def test_the_banner_names_the_weights_auto_uses():
    state = {"name": "x.jsonl", "rows": 30, "n_desirable": 10, "n_undesirable": 20, "weights": [1.0, 0.667]}
    assert "weights `auto` use 1 / 0.667" in train.data_banner(state)
    assert "No training data" in train.data_banner(None)


def test_duplicates_are_a_collapsed_note_not_a_problem():
    name = next(k for k in ui_runs.sample_files() if k.startswith("demo_kto"))
    problems = data.on_sample(name)[2]
    listed, note = problems.split("<details>")
    assert listed == "**Problems:**\nNo problems found.\n\n"
    assert "repeat an earlier one exactly" in note and note.endswith("</details>")


def test_clearing_the_upload_clears_its_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b", "label": "maybe"}\n')
    assert "Cannot use this file" in data.on_upload(str(bad))[2]
    summary, _, problems, report, *_, state, source = data.on_upload(None)  # what the clear event sends
    assert (summary, problems, report, state, source) == (data.EMPTY, "", "", None, None)


def test_data_knows_whether_it_is_the_demo_models_own(tmp_path, runs):
    upload = tmp_path / "copy.jsonl"
    upload.write_text(DEMO_SAMPLES["kto"].read_text())
    assert data.on_upload(str(upload))[-2]["demo"] is True  # by content, whatever its name
    other = tmp_path / "support.jsonl"
    other.write_text('{"prompt": "Reset my password", "completion": "Sure: ...", "label": true}\n')
    state = data.on_upload(str(other))[-2]
    assert state["demo"] is False and state["chars"] == len("Reset my password") + len("Sure: ...")


# ---------------------------------------------------------------------- Train tab
def _defaults():
    return [s.default for s in train.SPECS]


def test_recipe_shows_yaml_command_and_memory():
    state = {"path": str(DEMO_SAMPLES["kto"]), "name": "demo", "rows": 1, "n_desirable": 1, "n_undesirable": 0,
             "weights": [1.0, 1.0]}
    yaml_text, command, memory = train.show_recipe(state, "my run", *_defaults())
    assert f"data: {DEMO_SAMPLES['kto']}" in yaml_text and "-my-run" in yaml_text
    assert command.startswith("python -m kto_lite train --data ") and "--output_dir" in command
    assert "Estimated GPU memory" in memory and "total" in memory


def test_recipe_reports_a_bad_value():
    values = [0 if s.name == "batch_size" else s.default for s in train.SPECS]
    _, _, message = train.show_recipe(None, "", *values)
    assert "batch_size" in message


def test_start_warns_when_the_estimate_exceeds_the_gpu(monkeypatch):
    config = TrainConfig(data="d.jsonl", output_dir="x")
    monkeypatch.setattr(train, "_gpu_memory_gb", lambda: None)
    assert train.fit_warning(config) == ""  # no GPU: nothing to compare with
    monkeypatch.setattr(train, "_gpu_memory_gb", lambda: 0.01)
    assert "more than this GPU's 0.0 GiB" in train.fit_warning(config)


def test_start_needs_data():
    message, *_ = train.start_training(None, "", *_defaults())
    assert "Data" in message and jobs.JOBS.proc is None


def test_one_job_at_a_time_and_stop_is_graceful(runs):
    run = runs / "20250101-000000-fake"
    jobs.JOBS.start(["-c", FAKE_TRAINER, "--output_dir", str(run)], run)
    assert jobs.find_active(runs) == run  # known before status.json exists
    wait_until(lambda: jobs.run_state(run).state == "running")
    with pytest.raises(RuntimeError, match="already running"):
        jobs.JOBS.start(["-c", "pass"], runs / "other")
    state = {"path": "x.jsonl", "name": "x", "rows": 1, "n_desirable": 1, "n_undesirable": 0, "weights": [1, 1]}
    assert "Busy" in train.start_training(state, "", *_defaults())[0]

    assert "Stop requested" in train.stop_training(train.LATEST)
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
    assert "no checkpoint" in train.resume_training(train.LATEST)
    make_run(runs, "20250101-000001-b", status="finished")
    assert "finished" in train.resume_training(str(runs / "20250101-000001-b"))


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
    assert train.resolve_run(train.LATEST) == run


def test_progress_reads_the_run_folder_and_skips_when_nothing_changed(runs):
    rows = [{"step": s, "loss": 0.5 - s / 100, "kl": 0.1, "rewards/chosen": 0.1, "rewards/rejected": -0.1,
             "rewards/margins": 0.2, "learning_rate": 1e-5} for s in (1, 2, 3)]
    make_run(runs, "20250101-000000-a", metrics=rows)
    status, log, loss, rewards, kl, lr, judged, answers, dropdown, signature, _ = train.progress(train.LATEST, None)
    assert "finished" in status and "step 3 / 3" in status
    assert judged["visible"] is False and answers == ""  # no judge: no judged plot, no answers
    assert list(loss["value"].dropna()["value"]) == [0.49, 0.48, 0.47] and loss["visible"]
    assert set(rewards["value"]["series"]) == {"desirable", "undesirable", "margin"}
    assert [c[1] for c in dropdown["choices"]] == [train.LATEST, str(runs / "20250101-000000-a")]
    again = train.progress(train.LATEST, signature)
    assert again[:9] == (SKIP,) * 9


def test_progress_before_any_run_is_an_empty_state():
    status, log, *plots, answers, _, _, _ = train.progress(train.LATEST, None)
    assert "No runs yet" in status and answers == "" and all(p["value"] is None and p["visible"] is False for p in plots)


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


def test_log_tail_draws_a_nested_bar_over_its_own_line_and_drops_it_once_closed(runs):
    """What tqdm writes to the log for the judged evaluation's bar inside the training's (both real tqdm bars,
    as the trainer draws them): the training bar's last state, the nested bar gone once closed."""
    from tqdm import tqdm

    run = make_run(runs, "20250101-000000-a")
    with open(run / "train.log", "w") as log:
        log.write("start\n")
        outer = tqdm(total=2, desc="KTO", file=log, mininterval=0, ascii=True)
        for _ in range(2):
            for _ in tqdm(range(3), desc="judged evaluation", file=log, leave=False, mininterval=0, ascii=True):
                pass
            outer.update()
        outer.close()
        log.write("done\n")
    lines = jobs.log_tail(run).splitlines()
    assert lines[0] == "start" and lines[-1] == "done" and len(lines) == 3, lines
    assert lines[1].startswith("KTO: 100%") and "\x1b" not in jobs.log_tail(run)
    with open(run / "train.log", "a") as log:  # an evaluation still running: its bar under the training's
        outer = tqdm(total=2, initial=1, desc="KTO", file=log, mininterval=0, ascii=True)
        inner = tqdm(total=3, desc="judged evaluation", file=log, leave=False, mininterval=0, ascii=True)
        inner.update()
    lines = jobs.log_tail(run).splitlines()
    assert lines[-2].startswith("KTO:  50%") and lines[-1].startswith("judged evaluation:  33%"), lines


def test_eta_from_the_speed_seen(runs):
    run = make_run(runs, "20250101-000000-a")
    state = jobs.RunState("running", "training", step=10, total_steps=30)
    assert jobs.eta_seconds(run, state, now=100.0) is None  # first sight
    state.step = 20
    assert jobs.eta_seconds(run, state, now=110.0) == pytest.approx(10.0)


def _values(**settings):
    return [settings.get(s.name, s.default) for s in train.SPECS]


def _state(demo: bool, rows: int = 600, chars: int = 30_000) -> dict:
    return {"path": "x.jsonl", "name": "x.jsonl", "rows": rows, "n_desirable": rows // 2,
            "n_undesirable": rows - rows // 2, "weights": [1, 1], "chars": chars, "demo": demo}


def test_the_model_choice_offers_presets_with_one_line_each():
    model = train._field(train.SPECS[train.NAMES.index("model")])
    assert [value for _, value in model.choices] == [p.model for p in presets.PRESETS]
    labels = dict((v, k) for k, v in model.choices)
    assert labels[""] == "Built-in demo model · a tiny arithmetic model to try the workflow in a minute on CPU"
    assert labels[presets.SMOLLM2].endswith("a real chat model that trains on a CPU in minutes")
    assert model.allow_custom_value  # any Hub id, folder or .gguf typed in


def test_on_a_cpu_the_model_choice_says_how_long_the_run_takes(monkeypatch):
    monkeypatch.setattr(train, "_gpu_memory_gb", lambda: None)
    assert "choose data" in train.model_advice(None, *_values())
    speed = presets.CPU_SPEEDS[presets.SMOLLM2]
    expected = presets.cpu_seconds(speed, examples=600, chars=30_000, epochs=1, max_length=1024)
    advice = train.model_advice(_state(False), *_values(model=presets.SMOLLM2))
    assert f"about **{train.minutes(expected)}** for 600 examples (measured" in advice
    advice = train.model_advice(_state(False), *_values(model="Qwen/Qwen2.5-7B-Instruct"))
    assert "scaled by model size" in advice and "A GPU is what this model is meant for" in advice
    half = train.expected_seconds(train._config(_state(False), _values(model=presets.SMOLLM2, max_steps="19"),
                                                "x"), _state(False))[0]  # 19 steps of 16: about half an epoch
    assert half == pytest.approx(presets.cpu_seconds(speed, examples=600, chars=30_000, epochs=19 * 16 / 600,
                                                     max_length=1024))


def test_on_a_gpu_the_model_choice_says_whether_it_fits_and_how_to_make_it(monkeypatch):
    monkeypatch.setattr(train, "_gpu_memory_gb", lambda: 24.0)
    assert "**fits**" in train.model_advice(_state(False), *_values(model=presets.SMOLLM2))
    monkeypatch.setattr(train, "_gpu_memory_gb", lambda: 6.0)
    advice = train.model_advice(_state(False), *_values(model="Qwen/Qwen2.5-7B-Instruct", load_in_4bit=False))
    assert "**does not fit**" in advice and "load the base in 4-bit" in advice


def test_the_demo_model_on_data_not_its_own_asks_first(monkeypatch, runs):
    started = []
    monkeypatch.setattr(jobs.JOBS, "start", lambda argv, run, **kw: started.append(run))
    message, _, anyway = train.start_training(_state(False), "", *_values())
    assert "only knows small arithmetic questions" in message and "SmolLM2-135M-Instruct" in message
    assert anyway["visible"] is True and started == []
    message, _, anyway = train.start_anyway(_state(False), "", *_values())
    assert message.startswith("▶ Started") and anyway["visible"] is False and len(started) == 1
    message, *_ = train.start_training(_state(True), "", *_values())  # its own data: no question
    assert message.startswith("▶ Started") and len(started) == 2


def test_a_cpu_run_says_how_long_it_should_take_then_the_time_left(monkeypatch, runs):
    monkeypatch.setattr(train, "_gpu_memory_gb", lambda: None)
    monkeypatch.setattr(jobs.JOBS, "start", lambda argv, run, **kw: None)
    monkeypatch.setattr(train, "_EXPECTED", {})  # this run alone, whatever other tests started
    monkeypatch.setattr(jobs, "_FIRST_SEEN", {})
    message, *_ = train.start_training(_state(True, rows=400, chars=8000), "demo", *_values())
    assert "Expected to take about" in message
    run = next(iter(train._EXPECTED))
    state = jobs.RunState("running", "loading model", step=0, total_steps=75)
    assert "(expected)" in train.time_left(Path(run), state)  # before any step was timed
    state = jobs.RunState("running", "training", step=10, total_steps=30)
    assert jobs.eta_seconds(Path(run), state, now=100.0) is None
    state.step = 20
    assert jobs.eta_seconds(Path(run), state, now=110.0) == pytest.approx(10.0)  # then from the steps timed


def test_a_one_step_run_draws_no_empty_chart(runs):
    make_run(runs, "20250101-000000-a", metrics=[{"step": 1, "loss": 0.69, "kl": 0.0}])
    status, _, *plots, _, _, _, _ = train.progress(train.LATEST, None)
    assert all(p["visible"] is False for p in plots) and "1 step logged: nothing to plot" in status


def judged_line(step: int, success: float) -> dict:
    return {"step": step, "eval_judged_success": success, "eval_judged_success_low": success - 0.1,
            "eval_judged_success_high": success + 0.1}


def test_judged_success_is_plotted_beside_the_loss_from_step_0(runs):
    """A run with eval_prompts + judge: the judged plot is drawn from its second evaluation (step 0 is the
    first), its three series known from the start."""
    run = make_run(runs, "20250101-000000-a", metrics=[judged_line(0, 0.2)])
    plots = train.progress(train.LATEST, None)[2:7]
    assert plots[4]["visible"] is False  # one evaluation: nothing to draw yet
    with open(run / "metrics.jsonl", "a") as f:
        for step in (1, 2):
            f.write(json.dumps({"step": step, "loss": 0.5, "kl": 0.0}) + "\n")
        f.write(json.dumps({"step": 2, "loss": 0.4, **judged_line(2, 0.5)}) + "\n")
    plots = train.progress(train.LATEST, None)[2:7]
    judged = plots[4]
    assert judged["visible"] and set(judged["value"]["series"]) == {"judged success", "95% low", "95% high"}
    points = judged["value"].dropna()
    assert list(points[points["series"] == "judged success"]["value"]) == [0.2, 0.5]
    assert list(points["step"].unique()) == [0, 2]


def test_the_train_tab_shows_what_the_judge_saw_first_and_last(runs):
    """judged_samples.jsonl: the first and the latest evaluation's answers side by side, with the verdicts;
    text that would break the table (pipes, newlines, HTML) is made safe."""
    run = make_run(runs, "20250101-000000-a", metrics=[judged_line(0, 0.0), judged_line(2, 1.0)])
    kept = [{"step": 0, "prompt_index": 0, "prompt": "What is 2+3?", "answer": "6 | <b>six</b>\nok", "verdict": False},
            {"step": 0, "prompt_index": 1, "prompt": [{"role": "user", "content": "What is 1+1?"}], "answer": "2",
             "verdict": True},
            {"step": 1, "prompt_index": 0, "prompt": "What is 2+3?", "answer": "4", "verdict": False},
            {"step": 2, "prompt_index": 0, "prompt": "What is 2+3?", "answer": "5", "verdict": True},
            {"step": 2, "prompt_index": 1, "prompt": [{"role": "user", "content": "What is 1+1?"}], "answer": "2",
             "verdict": None}]
    (run / "judged_samples.jsonl").write_text("".join(json.dumps(k) + "\n" for k in kept))
    answers = train.progress(train.LATEST, None)[7]
    lines = answers.splitlines()
    assert "| prompt | step 0 | step 2 |" in lines  # the first and the latest evaluation, not step 1
    assert "| What is 2+3? | ✗ 6 \\| &lt;b&gt;six&lt;/b&gt; ok | ✓ 5 |" in lines
    assert "| What is 1+1? | ✓ 2 | ? 2 |" in lines  # a conversation shows its question; no verdict: ?


def test_a_finished_run_is_reported_once_to_the_chat_tab(runs):
    run = make_run(runs, "20250101-000000-a", status="running", pid=os.getpid())
    *_, signature, finished = train.progress(train.LATEST, None)
    assert finished == SKIP
    (run / "status.json").write_text(json.dumps({"status": "finished", "step": 3, "total_steps": 3}))
    *_, signature, finished = train.progress(train.LATEST, signature)
    assert finished == str(run)
    assert train.progress(train.LATEST, signature)[-1] == SKIP  # seen once


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
    monkeypatch.setattr(chat, "get_chat_model", lambda source, base_model=None: model)
    return model


def _chat(source, side_by_side=False, message="Hello", tuned=(), base=(), turns=None, system="be brief"):
    return list(chat.chat_send(message, list(tuned), list(base), source, "", side_by_side, system, 0.0, 0.9, 16,
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
    replies = chat.chat_send("Hello", [], [], str(run), "", False, "", 0.7, 0.9, 16)
    next(replies), next(replies)  # loading, first word
    chat.stop_chat()
    *_, (box, tuned, base, status, _) = list(replies)
    assert tuned[-1]["content"] == "tuned" and "Stopped" in status


def test_thumbs_on_a_reply_append_a_feedback_row(runs):
    run = make_run(runs, "20250101-000000-a", adapter=True)
    history = [{"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "5"}]}]
    counts = chat.on_like(history, str(run), "", None, "tuned",
                        gr.LikeData(None, {"index": 1, "value": "5", "liked": False}))
    assert "0 liked / 1 disliked" in counts
    row = json.loads((run / "feedback.jsonl").read_text())
    assert row == {"prompt": "What is 2 + 2?", "completion": "5", "label": False}
    like = gr.LikeData(None, {"index": 0, "value": "x", "liked": True})
    assert chat.on_like(history, str(run), "", None, "tuned", like) == SKIP


def _like(index, liked=True):
    return gr.LikeData(None, {"index": index, "value": "", "liked": liked})


def test_feedback_keeps_the_system_prompt_that_conditioned_the_reply(fake_model, runs):
    from kto_lite.data import encode_prompt, load_data, tokenize
    from kto_lite.demo import DEMO_MODEL_DIR
    from kto_lite.model import load_tokenizer

    run = make_run(runs, "20250101-000000-a", adapter=True)
    _, tuned, _, _, turns = _chat(str(run), system="Answer in one sentence.")[-1]
    _, tuned, _, _, turns = _chat(str(run), message="Again", tuned=tuned, turns=turns, system="")[-1]
    chat.on_like(tuned, str(run), "", turns, "tuned", _like(1))  # the reply made with the system prompt
    chat.on_like(tuned, str(run), "", turns, "tuned", _like(3, False))  # the one made without
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
    steps = list(chat.base_column(str(run), True, tuned, base, turns, "", 0.0, 0.9, 16))
    base, status, base_turns = steps[-1]
    assert "earlier message" in steps[0][1] and "tokens in" in status
    assert [m["content"] for m in base] == ["Hello", "base says hi", "Again", "base says hi"]
    replayed = fake_model.calls[len(tuned_calls):]
    assert [use_adapter for _, use_adapter, _ in replayed] == [False, False]
    # each earlier message is answered with the seed and system prompt of the tuned reply to it, over the
    # base's own conversation: what the column would hold had side by side been on from the start
    assert [o["seed"] for *_, o in replayed] == [o["seed"] for *_, o in tuned_calls]
    assert replayed[1][0] == base[:3] and base_turns["base"] == {1: turns["tuned"][1], 3: turns["tuned"][3]}
    again = list(chat.base_column(str(run), True, tuned, base, base_turns, "", 0.0, 0.9, 16))
    assert len(again) == 1 and again[0][0]["value"] == base  # nothing missing: nothing generated
    assert chat.base_column(str(run), False, tuned, base, turns, "", 0, 0.9, 16).__next__()[0]["visible"] is False


def test_base_model_feedback_goes_to_the_runs_feedback_folder(runs):
    assert ui_runs.feedback_path(ui_runs.BASE, "") == runs / "_feedback" / "demo.jsonl"
    assert ui_runs.feedback_path(ui_runs.BASE, "Qwen/Qwen2.5-0.5B-Instruct") == runs / "_feedback" / "qwen2-5-0-5b-instruct.jsonl"


def test_chat_choices_are_runs_with_an_adapter_then_the_base(runs):
    with_adapter = make_run(runs, "20250101-000000-a", adapter=True)
    make_run(runs, "20250101-000001-b")
    assert [v for _, v in chat.chat_choices()] == [str(with_adapter), ui_runs.BASE]


def test_a_path_outside_the_runs_folder_is_refused(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "status.json").write_text("{}")
    with pytest.raises(gr.Error):
        ui_runs.feedback_path(str(outside))


# ---------------------------------------------------------------------- Export tab
def test_zip_and_snippet(runs):
    run = make_run(runs, "20250101-000000-a", adapter=True)
    (run / "config.yaml").write_text("model: null\n")
    path, message = export.zip_run(str(run))
    assert Path(path).name == f"{run.name}-adapter.zip" and format_bytes(Path(path).stat().st_size) in message
    assert f"{run.name}/adapter_model.safetensors" in zipfile.ZipFile(path).namelist()
    assert "PeftModel.from_pretrained" in export.load_code(str(run), "adapter")
    assert "merge the adapter first" in export.load_code(str(run), "merged")


def test_merge_notice_gives_the_memory_needed(runs):
    run = make_run(runs, "20250101-000000-a", adapter=True)
    (run / "config.yaml").write_text("model: null\n")
    notice = export.merge_notice(str(run))
    assert "of RAM" in notice and "unquantized" in notice
    assert notice.startswith("Before you press **Merge**: it will reload")  # not "Merging..." before the press


# ---------------------------------------------------------------------- the app under real use
@pytest.fixture
def fake_training(monkeypatch):
    """The Train tab's Start launches FAKE_TRAINER instead of `python -m kto_lite train` (same run folder)."""
    long_run = FAKE_TRAINER.replace("range(500)", "range(10_000)")  # minutes: it is still running when looked at
    monkeypatch.setattr(form, "train_argv", lambda config: ["-c", long_run, "--output_dir", config.output_dir])


def test_two_starts_at_once_one_runs_and_the_other_names_it(runs, fake_training):
    import threading

    barrier, answers = threading.Barrier(2), []

    def press_start(name):
        barrier.wait()  # both clicks arrive together (two browser tabs)
        answers.append(train.start_training(_state(True), name, *_values())[0])

    threads = [threading.Thread(target=press_start, args=(name,)) for name in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    started = [a for a in answers if a.startswith("▶ Started")]
    busy = [a for a in answers if "Busy" in a]
    assert len(started) == 1 and len(busy) == 1, answers
    assert jobs.JOBS.run.name in busy[0]  # the refusal names the run that holds the device
    assert "already running" in busy[0] or "is training" in busy[0]


def test_a_restarted_app_finds_the_running_job_follows_and_stops_it(runs, fake_training, monkeypatch):
    message, *_ = train.start_training(_state(True), "long", *_values())
    run, before = jobs.JOBS.run, jobs.JOBS
    wait_until(lambda: jobs.run_state(run).state == "running")
    monkeypatch.setattr(jobs, "JOBS", jobs.JobManager())  # the server restarted: it knows nothing
    assert train.resolve_run(train.LATEST) == run
    status = train.progress(train.LATEST, None)[0]
    assert "kto-running" in status and run.name in status
    assert run.name in train.start_training(_state(True), "other", *_values())[0]  # still one job at a time
    assert "Stop requested" in train.stop_training(train.LATEST)  # by its pid, from status.json
    wait_until(lambda: jobs.run_state(run).state == "stopped")
    before.proc.wait(10)


def test_a_killed_training_is_failed_with_its_last_log_lines(runs, fake_training):
    import signal

    train.start_training(_state(True), "oom", *_values())
    run = jobs.JOBS.run
    wait_until(lambda: jobs.run_state(run).state == "running")
    os.kill(jobs.JOBS.proc.pid, signal.SIGKILL)  # what the OOM killer does
    wait_until(lambda: jobs.run_state(run).state == "failed")
    status = train.progress(str(run), None)[0]
    assert "kto-failed" in status and "killed" in status and "fake trainer started" in status  # its log's end
    assert jobs.find_active(runs) is None  # the device is free again


@pytest.mark.multiprocess
def test_feedback_written_at_once_by_chat_rate_and_other_processes_loses_no_row(runs):
    import subprocess
    import threading

    from ui.tabs import rate

    run = make_run(runs, "20250101-000000-a", adapter=True)
    path = run / "feedback.jsonl"
    writer = ("import sys; from kto_lite.feedback.chat import append_feedback\n"
              "for i in range(40): append_feedback(sys.argv[1], f'process {sys.argv[2]} row {i}', 'x' * 3000, True)")
    processes = [subprocess.Popen([sys.executable, "-c", writer, str(path), str(k)]) for k in range(2)]

    def thumbs(k):  # the Chat tab
        for i in range(40):
            chat.record_feedback(str(run), "", f"chat {k} row {i}", "y" * 3000, i % 2 == 0)

    def rate_tab(k):  # the Rate tab's save
        items = [{"prompt": f"rate {k} row {i}", "completion": "z" * 3000, "label": False, "saved": False,
                  "by": "you", "row": {}, "index": i} for i in range(40)]
        saved.append(rate.save_ratings({"source": str(run), "base_model": "", "system": None, "items": items})[0])

    saved = []

    threads = [threading.Thread(target=f, args=(k,)) for k in range(2) for f in (thumbs, rate_tab)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.wait(60) for p in processes] == [0, 0]
    assert len(saved) == 2 and all("Added 40 rated answers" in text for text in saved)
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # every line whole: none interleaved
    prompts = {r["prompt"] for r in rows}
    assert len(rows) == len(prompts) == 2 * 40 * 3
    assert {f"process {k} row {i}" for k in range(2) for i in range(40)} <= prompts


# ---------------------------------------------------------------------- the welcome
def test_the_welcome_shows_until_the_first_run_and_fills_data_and_model(runs, monkeypatch):
    assert welcome.welcome_visible()["visible"] is True
    *described, source, model, message, tabs, panel = list(welcome.guided_start("demo"))[-1]
    state = described[-1]
    assert state["path"] == str(presets.GUIDED_STARTS["demo"].data) and state["demo"] and model == ""
    assert "press **▶ Start**" in message and tabs.selected == "train" and panel["visible"] is False
    fetched = []
    monkeypatch.setattr(presets, "local_source", lambda model: fetched.append(model) or "/cache/smollm2.gguf")
    steps = list(welcome.guided_start("smollm2"))
    assert "Getting SmolLM2" in steps[0][-3] and fetched == [presets.SMOLLM2]  # fetched before Start
    *described, source, model, message, tabs, panel = steps[-1]
    assert model == presets.SMOLLM2 and described[-1]["rows"] == 600 and described[-1]["demo"] is False
    make_run(runs, "20250101-000000-a")
    assert welcome.welcome_visible()["visible"] is False
    assert welcome.hide_after_start("▶ Started `x`.")["visible"] is False  # a run started from the Train tab
    assert welcome.hide_after_start("⚠ The built-in demo model only knows...") == SKIP


def test_app_builds_with_one_tab_per_concern():
    from ui.app import build_demo

    demo = build_demo()
    tabs = [b.label for b in demo.blocks.values() if isinstance(b, gr.Tab)]
    assert tabs == ["Data", "Train", "Chat", "Rate", "Export"]
    tab_bar, = [b for b in demo.blocks.values() if isinstance(b, gr.Tabs)]
    assert all(isinstance(child, gr.Tab) for child in tab_bar.children)  # anything else shifts the tab names
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


@pytest.mark.slow
@pytest.mark.parametrize("demo_adapter_run", [True], indirect=True, ids=["with-data"])
def test_merge_then_the_snippet_radio_follows_and_sizes_are_readable(demo_adapter_run):
    assert export.snippet_after_merge(str(demo_adapter_run)) == SKIP  # nothing merged yet: the radio stays
    log, snippet = _final(export.merge_run(str(demo_adapter_run), "quantized"))
    assert (demo_adapter_run / "merged" / "config.json").is_file(), log["value"]
    assert "of RAM" in log["value"] and "0.0 GiB" not in log["value"] and "mean |Δ log p|" in log["value"]
    assert "AutoModelForCausalLM.from_pretrained" in snippet and "merged" in snippet
    assert export.snippet_after_merge(str(demo_adapter_run)) == "merged"  # the radio says what the snippet shows
    assert export.load_code(str(demo_adapter_run), "merged") == snippet
    log, _ = _final(export.merge_run(str(demo_adapter_run), "full"))
    assert (demo_adapter_run / "merged-full" / "config.json").is_file(), log["value"]


@pytest.mark.parametrize("demo_adapter_run", [True], indirect=True, ids=["with-data"])
def test_before_and_after_answer_held_out_questions_with_the_same_random_numbers(demo_adapter_run):
    """The demo's guided start: its held-out questions, judged. A fresh LoRA adapter (B = 0) changes
    nothing, so with the same random numbers before and after must give the same answers."""
    steps = list(chat.before_after(str(demo_adapter_run)))
    table, summary = steps[-1]
    heldout = [json.loads(line)["prompt"] for line in presets.GUIDED_STARTS["demo"].heldout.read_text().splitlines()]
    assert [row[0] for row in table] == heldout[:chat.COMPARE_PROMPTS]
    assert all(before == after and before[:2] in ("✓ ", "✗ ") for _, before, after in table)
    right = sum(before.startswith("✓") for _, before, _ in table)
    assert f"Before: {right} of 8 right → after: {right} of 8 right" in summary and "held-out" in summary
    assert "1 / 8" in steps[1][1]  # progress as the answers come


@pytest.mark.slow
def test_gguf_export_gives_the_file_the_modelfile_and_the_commands(demo_adapter_run):
    log, files, commands = _final(export.gguf_run(str(demo_adapter_run), "q8_0", "quantized"))
    names = sorted(Path(f).name for f in files)
    assert names == ["20250101-000000-demo-quantized-q8_0.Modelfile", "20250101-000000-demo-quantized-q8_0.gguf"], \
        log["value"]
    assert "llama-cli -m" in commands and "ollama create 20250101-000000-demo -f" in commands
    log, files, commands = _final(export.gguf_run(str(demo_adapter_run), "lora"))
    assert [Path(f).name for f in files] == ["20250101-000000-demo-lora.gguf"] and "--base_gguf" in log["value"]


@pytest.mark.slow
def test_hub_push_without_a_token_explains_and_with_one_links(demo_adapter_run, monkeypatch, tmp_path):
    from test_hub import stand_in_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    log, message = _final(export.push_run(str(demo_adapter_run), "me/demo"))
    assert "HF_TOKEN" in log["value"] and "failed" in message
    with stand_in_hub(monkeypatch) as calls:
        monkeypatch.delenv("HF_HUB_OFFLINE")  # the export runs in a subprocess: offline comes from the environment
        log, message = _final(export.push_run(str(demo_adapter_run), "me/demo", False))
    assert "Uploaded: [http://127.0.0.1" in message, log["value"]
    assert any(path == "/api/repos/create" for _, path, *_ in calls)
    assert (demo_adapter_run / "README.md").read_text().startswith("---")
