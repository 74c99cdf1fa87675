"""Handlers of the Data and Train tabs: plain functions from component values to component values.

They hold no Gradio layout (app.py builds it and wires these in) and no training logic: data is read
with `kto_lite.data.load_data`, settings become a `TrainConfig`, and training is the
`python -m kto_lite train` process started by jobs.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from kto_lite.data import CANONICAL, load_data
from kto_lite.data.read import SUFFIXES
from kto_lite.data.report import FORMATS
from kto_lite.errors import ConfigError, DataError
from kto_lite.runs import FEEDBACK_FILE, checkpoints

from . import form, jobs

LATEST = "__latest__"  # the run dropdown's "follow the newest job" choice
MAP_TARGETS = tuple(c for c in CANONICAL if c != "kto_tag")  # kto_tag is another name for label
NOT_IN_FILE = "(none)"
PREVIEW_ROWS = 50


@dataclass
class Settings:
    """What `python -m ui` was started with; tests point runs_dir at a temporary folder."""

    runs_dir: Path = field(default_factory=lambda: Path(os.environ.get("KTO_LITE_RUNS", "runs")))


SETTINGS = Settings()
SPECS = form.field_specs()  # the train form's fields, in the order app.py creates the components


# ---------------------------------------------------------------------- Data tab
def sample_files() -> dict[str, Path]:
    """Shipped sample files by the name the Data tab shows ({} when the demo package is missing)."""
    try:
        from kto_lite.demo import DEMO_SAMPLES
    except ImportError:
        return {}
    return {f"{path.name} ({name})": path for name, path in DEMO_SAMPLES.items() if path.is_file()}


def feedback_files() -> dict[str, Path]:
    """Feedback recorded in the Chat tab: <run>/feedback.jsonl and runs/_feedback/*.jsonl."""
    runs = SETTINGS.runs_dir
    found = [run / FEEDBACK_FILE for run in jobs.list_runs(runs)]
    found += sorted((runs / "_feedback").glob("*.jsonl")) if (runs / "_feedback").is_dir() else []
    from kto_lite.feedback.chat import feedback_counts

    out = {}
    for path in found:
        if path.is_file():
            counts = feedback_counts(path)
            name = path.parent.name if path.name == FEEDBACK_FILE else f"base model {path.stem}"
            out[f"{name}: {counts['desirable']} liked / {counts['undesirable']} disliked"] = path
    return out


def stage_file(path: str | Path, tag: str = "") -> Path:
    """Copy a file the app does not own (an upload, a growing feedback file) to runs/_data/<sha256><suffix>.

    The name comes from the content, never from the uploaded name, and a run's config.yaml then points
    at a file that does not change or disappear when Gradio clears its upload cache.
    """
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    suffix = path.suffix.lower() if path.suffix.lower() in SUFFIXES else ""
    target = SETTINGS.runs_dir / "_data" / f"{tag}{digest}{suffix}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return target


def _short(value, limit: int = 160) -> str:
    if isinstance(value, list):  # chat messages
        value = "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in value if isinstance(m, dict))
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _preview(examples) -> list[list]:
    return [[ex.row, "desirable" if ex.label else "undesirable", _short(ex.prompt), _short(ex.completion)]
            for ex in examples[:PREVIEW_ROWS]]


def _summary(name: str, report) -> str:
    total = max(report.rows_out, 1)
    fmt = FORMATS.get(report.data_format, report.data_format) + (", chat messages" if report.conversational else "")
    weights = (report.desirable_weight, report.undesirable_weight)
    advice = " (the labels are balanced)" if weights == (1.0, 1.0) else \
        ": they balance the two labels' share of the loss (training's default `auto` uses them)"
    return (
        f"### {html.escape(name)}\n"
        f"- format: {fmt}\n"
        f"- **{report.rows_out} examples** (from {report.rows_in} {report.row_unit}s): "
        f"**{report.n_desirable} desirable** ({100 * report.n_desirable / total:.0f}%), "
        f"**{report.n_undesirable} undesirable** ({100 * report.n_undesirable / total:.0f}%)\n"
        f"- suggested weights (KTO paper, eq. 8): desirable_weight **{weights[0]:.3g}**, "
        f"undesirable_weight **{weights[1]:.3g}**{advice}"
    )


def _problems(report) -> list[str]:
    """The report's warnings, less the label balance: the suggested weights (shown in the summary)
    take care of any split, so a 49/51 split is information, not a problem. One-sided data stays."""
    balanced = dataclasses.replace(report, desirable_weight=1.0, undesirable_weight=1.0)
    balanced.refresh()  # the same warnings, without the one the weights caused
    return [w for w in report.warnings if w in balanced.warnings]


def _markdown_text(text: str) -> str:
    """Plain text shown as Markdown: the characters Markdown would interpret, then HTML's <, > and &
    escaped (in this order: a backslash before the # of an HTML entity would show the entity)."""
    return html.escape(re.sub(r"([\\`*_\[\]#|~])", r"\\\1", text), quote=False)


def _error_markdown(error: Exception, path: str | Path, shown: str) -> str:
    """A DataError as wrapped Markdown (a code block cuts long lines), naming the file as the user knows it."""
    text = str(error).replace(str(Path(path)), shown)
    return "\n".join(f"- {_markdown_text(line)}" for line in text.splitlines())


def _data_outputs(summary="", rows=(), problems="", report="", mapping=False, boxes=None, state=None) -> tuple:
    """The Data tab's outputs, flat: summary, preview, problems, report, mapping group, 6 dropdowns, state."""
    if boxes is None:
        boxes = [gr.update(choices=[NOT_IN_FILE], value=NOT_IN_FILE)] * len(MAP_TARGETS)
    return (summary, list(rows), problems, report, gr.update(visible=mapping), *boxes, state)


def describe_data(path: str | Path | None, name: str, column_map: dict | None = None,
                  shown: str | None = None) -> tuple:
    """Read a data file and describe it for the Data tab (outputs as `_data_outputs`).

    `shown` is how messages name the file (an upload: the name the user gave it, not where it is
    kept). The state output is what the Train tab trains on: {"path", "name", "rows", "n_desirable",
    "n_undesirable", "weights"}, or None when the file cannot be used.
    """
    if not path:
        return _data_outputs("No data yet: upload a file or pick a sample.")
    shown = shown or str(path)
    try:
        examples, report = load_data(path, column_map or None)
    except DataError as e:
        problem = f"### Cannot use this file\n\n{_error_markdown(e, path, shown)}"
        if e.row is not None or not isinstance(e.value, list):  # a bad row, not unknown columns
            return _data_outputs(problems=problem)
        columns = e.value  # DataError's value for undetectable columns: the columns found
        problem += "\n\nIf the columns have other names, say which column is which below, then **Apply mapping**."
        boxes = [gr.update(choices=[NOT_IN_FILE, *columns], value=t if t in columns else NOT_IN_FILE)
                 for t in MAP_TARGETS]
        return _data_outputs(problems=problem, mapping=True, boxes=boxes)
    if column_map:  # the trainer reads files, not column maps: save the mapped examples as format 1
        path = _write_mapped(examples, Path(path), column_map)
    problems = "\n".join(f"- {_markdown_text(w)}" for w in _problems(report)) or "No problems found."
    state = {"path": str(path), "name": name, "rows": report.rows_out, "n_desirable": report.n_desirable,
             "n_undesirable": report.n_undesirable,
             "weights": [report.desirable_weight, report.undesirable_weight]}
    report.path = shown
    return _data_outputs(_summary(name, report), _preview(examples), "**Problems:**\n" + problems,
                         report.format(), boxes=[gr.skip()] * len(MAP_TARGETS), state=state)


def _write_mapped(examples, source: Path, column_map: dict) -> Path:
    lines = [json.dumps({"prompt": ex.prompt, "completion": ex.completion, "label": ex.label}, ensure_ascii=False)
             for ex in examples]
    key = hashlib.sha256((str(source) + json.dumps(column_map, sort_keys=True)).encode()).hexdigest()[:16]
    target = SETTINGS.runs_dir / "_data" / f"mapped-{key}.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def on_upload(file_path: str | None):
    """A new upload: staged under runs/_data, then described. The last output is the mapping source."""
    if not file_path:
        return (*describe_data(None, ""), None)
    # The upload's name is only shown (escaped); where the file is kept comes from its content.
    shown = Path(file_path).name
    source = {"path": str(stage_file(file_path)), "name": f"{shown} (uploaded)", "shown": shown}
    return (*describe_data(source["path"], source["name"], shown=shown), source)


def on_sample(choice: str | None):
    path = sample_files().get(choice or "")
    source = {"path": str(path), "name": choice} if path else None
    return (*describe_data(path, choice or ""), source)


def on_feedback_file(choice: str | None):
    path = feedback_files().get(choice or "")
    if not path:
        return (*describe_data(None, ""), None)
    source = {"path": str(stage_file(path, "feedback-")), "name": f"feedback of {choice}", "shown": str(path)}
    return (*describe_data(source["path"], source["name"], shown=source["shown"]), source)


def on_map_columns(source: dict | None, *targets: str):
    """Apply the mapping dropdowns (one per canonical column, each naming a file column or none)."""
    if not source:
        return _data_outputs("No data yet: upload a file or pick a sample.")
    column_map = {col: target for target, col in zip(MAP_TARGETS, targets, strict=True)
                  if col and col != NOT_IN_FILE}
    return describe_data(source["path"], source["name"], column_map, shown=source.get("shown"))


def refresh_feedback_choices(current: str | None):
    return gr.update(choices=list(feedback_files()), value=current)


def data_banner(state: dict | None) -> str:
    """The Train tab's one line about the data it will train on."""
    if not state:
        return "⚠ **No training data chosen.** Pick a sample or upload a file in the **Data** tab."
    d, u = state["weights"]
    return (f"**Training data:** {html.escape(state['name'])}: {state['rows']} examples "
            f"({state['n_desirable']} desirable / {state['n_undesirable']} undesirable; weights `auto` "
            f"use {d:.3g} / {u:.3g})")


# ---------------------------------------------------------------------- Train tab
def _config(state: dict | None, values: list, output_dir: Path):
    return form.build_config(SPECS, list(values), data=state["path"] if state else None, output_dir=output_dir)


def _run_label(values: list, run_name: str) -> str:
    if run_name and run_name.strip():
        return run_name
    model = dict(zip([s.name for s in SPECS], values, strict=True)).get("model") or "demo"
    return Path(str(model).rstrip("/")).name


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


def show_recipe(state: dict | None, run_name: str, *values):
    """The YAML and the command line of exactly these settings, plus the memory estimate."""
    output_dir = jobs.new_run_dir(SETTINGS.runs_dir, _run_label(list(values), run_name))
    try:
        config = _config(state, values, output_dir)
    except ConfigError as e:
        return "", "", f"**Error:** {e}"
    note = "" if state else "\n\n⚠ No data chosen yet: `data` is empty (pick data in the Data tab)."
    return config.to_yaml(), form.command_line(form.train_argv(config)), memory_estimate(config) + note


def start_training(state: dict | None, run_name: str, *values):
    """Start a run in a new folder. Returns (message, run dropdown update)."""
    if not state:
        return "⚠ Choose training data in the **Data** tab first.", gr.skip()
    busy = jobs.find_active(SETTINGS.runs_dir)
    if busy is not None:
        return (f"**Busy:** `{busy.name}` is training. One job at a time: stop it or wait for it to finish.",
                gr.skip())
    run = jobs.new_run_dir(SETTINGS.runs_dir, _run_label(list(values), run_name))
    try:
        config = _config(state, values, run)
        jobs.JOBS.start(form.train_argv(config), run)
    except ConfigError as e:
        return f"**Error:** {e}", gr.skip()
    except RuntimeError as e:
        return f"**Busy:** {e}", gr.skip()
    return (f"▶ Started `{run.name}`. Progress below; closing the browser does not stop it." + fit_warning(config),
            run_choices(LATEST))


def run_folder(value: str | None) -> Path | None:
    """A run folder named by a dropdown (which accept typed values): only a run under the runs folder."""
    if not value:
        return None
    path = Path(value)
    runs = SETTINGS.runs_dir.resolve()
    if path.resolve().parent != runs or not (path / "status.json").is_file():
        path = runs / path.name  # a bare run name also works
        if not (path / "status.json").is_file():
            raise gr.Error(f"{value} is not a run folder in {SETTINGS.runs_dir}")
    return SETTINGS.runs_dir / path.name


def resolve_run(choice: str | None) -> Path | None:
    """The run the Train tab shows: the chosen one, or for LATEST the active job, else the newest run."""
    if choice and choice != LATEST:
        return run_folder(choice)
    active = jobs.find_active(SETTINGS.runs_dir)
    if active is not None:
        return active
    runs = jobs.list_runs(SETTINGS.runs_dir)
    return runs[0] if runs else None


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


def run_choices(value=None):
    """Dropdown update: "latest job" plus every run with its state."""
    choices = [("Latest job (follows new runs)", LATEST)]
    for run in jobs.list_runs(SETTINGS.runs_dir):
        choices.append((f"{run.name} · {jobs.run_state(run).state}", str(run)))
    return gr.update(choices=choices, value=value) if value is not None else gr.update(choices=choices)


def status_html(run: Path | None, state: jobs.RunState | None) -> str:
    if run is None or state is None:
        return "<div class='kto-status'>No runs yet. Choose data, check the settings, then press <b>Start</b>.</div>"
    total = state.total_steps or 0
    pct = 100 * state.step / total if total else 0
    eta = jobs.eta_seconds(run, state)
    parts = [f"<b>{html.escape(run.name)}</b>", f"<span class='kto-{state.state}'>{state.state}</span>"]
    if state.phase and state.phase != state.state:
        parts.append(html.escape(state.phase))
    if total:
        parts.append(f"step {state.step} / {total}")
    if state.state in ("running", "stopping") and total:
        parts.append(f"ETA {jobs.format_seconds(eta)}")
    bar = f"<progress max='100' value='{pct:.1f}'></progress>" if total else ""
    message = f"<div>{html.escape(state.message)}</div>" if state.message else ""
    return f"<div class='kto-status'>{' · '.join(parts)}{bar}{message}</div>"


def progress(choice: str | None, last_signature):
    """One timer tick: (status, log tail, loss, rewards, kl, learning rate, run dropdown, signature).

    Everything is read from the run folder; outputs are skipped when nothing changed, so the plots
    do not redraw every tick.
    """
    jobs.JOBS.reap()
    try:
        run = resolve_run(choice)
    except gr.Error:  # the chosen run was deleted: follow the latest job instead of failing every tick
        run = resolve_run(LATEST)
    state = jobs.run_state(run) if run is not None else None
    eta = jobs.eta_seconds(run, state) if run is not None else None
    runs = [(r.name, jobs.run_state(r).state) for r in jobs.list_runs(SETTINGS.runs_dir)]
    signature = [str(run), jobs.files_signature(run) if run else None, state.state if state else None, runs]
    last_signature = last_signature or [None] * 4
    dropdown = run_choices() if runs != last_signature[3] else gr.skip()
    if signature[:3] == last_signature[:3]:
        status = status_html(run, state) if eta is not None else gr.skip()  # only the ETA moved
        return (status,) + (gr.skip(),) * 5 + (dropdown, signature)
    frames = jobs.metric_frames(run)
    log = jobs.log_tail(run) if run else ""
    return (status_html(run, state), log, *frames.values(), dropdown, signature)
