"""The Data tab: upload a file, pick a shipped sample or the app's own feedback, map unknown columns.

Data is read with `kto_lite.data.load_data`; what the Train tab trains on is a gr.State (`describe_data`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from kto_lite.data import CANONICAL, load_data
from kto_lite.data.read import SUFFIXES
from kto_lite.data.report import FORMATS
from kto_lite.errors import DataError

from .. import runs

MAP_TARGETS = tuple(c for c in CANONICAL if c != "kto_tag")  # kto_tag is another name for label
OTHER_NAMES = {  # column names people give the canonical columns (pre-filled in the mapping dropdowns)
    "prompt": ("question", "instruction", "input", "query", "user"),
    "completion": ("answer", "response", "output", "reply", "assistant"),
    "label": ("kto_tag", "rating", "score", "feedback", "thumbs", "liked", "desirable"),
    "messages": ("conversation", "chat", "dialog", "turns"),
    "chosen": ("preferred", "accepted", "better"),
    "rejected": ("dispreferred", "worse"),
}
NOT_IN_FILE = "(none)"
PREVIEW_ROWS = 50
DATA_TYPES = list(SUFFIXES)
EMPTY = "No data yet: upload a file or pick a sample."


# ---------------------------------------------------------------------- describing a file
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


def _problems(report) -> tuple[list[str], list[str]]:
    """(problems, notes) among the report's warnings. Not problems: the label balance (the suggested
    weights, shown in the summary, take care of any split, so a 49/51 split is information; one-sided
    data stays a problem) and exact duplicates (kept, and often intended: several rated answers to one
    prompt are the usual feedback; they are a note). Each is told apart by rebuilding the warnings
    without it (DataReport.refresh), never by its wording."""
    balanced = dataclasses.replace(report, desirable_weight=1.0, undesirable_weight=1.0)
    balanced.refresh()  # the same warnings, without the one the weights caused
    unique = dataclasses.replace(balanced, duplicate_rows=[])
    unique.refresh()
    problems = [w for w in report.warnings if w in unique.warnings]
    notes = [w for w in report.warnings if w in balanced.warnings and w not in unique.warnings]
    return problems, notes


def _problems_markdown(report) -> str:
    problems, notes = _problems(report)
    text = ("**Problems:**\n" + "\n".join(f"- {runs.markdown_text(w)}" for w in problems)) if problems else \
        "**Problems:**\nNo problems found."
    if report.duplicate_rows:
        repeated = sum(len(group) - 1 for group in report.duplicate_rows)
        listed = "\n".join(f"- {runs.markdown_text(w)}" for w in notes)
        text += (f"\n\n<details><summary>ℹ️ Note: {repeated} example(s) repeat an earlier one exactly "
                 f"(kept; click for the rows)</summary>\n\n{listed}\n\n</details>")
    return text


def _chars(examples) -> int:
    """Characters of prompt and completion text: with the tokens per character measured for a model,
    what the Train tab's expected duration is computed from (kto_lite.presets.cpu_seconds)."""
    def text(content) -> str:
        if isinstance(content, list):
            return "".join(str(m.get("content", "")) for m in content if isinstance(m, dict))
        return str(content)

    return sum(len(text(ex.prompt)) + len(text(ex.completion)) for ex in examples)


def is_demo_data(path: str | Path) -> bool:
    """Whether a file holds one of the demo model's own samples (by content: an upload of one counts)."""
    from kto_lite.demo import DEMO_SAMPLES

    digest = _sha256(path)
    return any(sample.is_file() and _sha256(sample) == digest for sample in DEMO_SAMPLES.values())


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def guess_columns(columns: list[str]) -> dict[str, str]:
    """{canonical name: file column} for the mapping dropdowns, from the usual other names: a target is
    filled only when exactly one column has one of its names."""
    lower = {c.lower().strip(): c for c in columns}
    guess = {}
    for target in MAP_TARGETS:
        found = [lower[name] for name in (target, *OTHER_NAMES.get(target, ())) if name in lower]
        if len(found) == 1:
            guess[target] = found[0]
    return guess


def _data_outputs(summary="", rows=(), problems="", report="", mapping=False, boxes=None, state=None) -> tuple:
    """The Data tab's outputs, flat: summary, preview, problems, report, mapping group, 6 dropdowns, state."""
    if boxes is None:
        boxes = [gr.update(choices=[NOT_IN_FILE], value=NOT_IN_FILE)] * len(MAP_TARGETS)
    return (summary, list(rows), problems, report, gr.update(visible=mapping), *boxes, state)


def describe_data(path: str | Path | None, name: str, column_map: dict | None = None,
                  shown: str | None = None, demo: bool | None = None) -> tuple:
    """Read a data file and describe it for the Data tab (outputs as `_data_outputs`).

    `shown` is how messages name the file (an upload: the name the user gave it, not where it is
    kept). The state output is what the Train tab trains on: {"path", "columns" (the mapping: the run's
    `columns` field), "name", "rows", "n_desirable", "n_undesirable", "weights", "chars", "demo"}, or None
    when the file cannot be used. "demo": the data is the built-in demo model's own (`demo`, or when None:
    the file is one of its samples).
    """
    if not path:
        return _data_outputs(EMPTY)
    shown = shown or str(path)
    try:
        examples, report = load_data(path, column_map or None)
    except DataError as e:
        problem = f"### Cannot use this file\n\n{runs.error_markdown(e, path, shown)}"
        if e.row is not None or not isinstance(e.value, list):  # a bad row, not unknown columns
            return _data_outputs(problems=problem)
        columns = e.value  # DataError's value for undetectable columns: the columns found
        guess = guess_columns(columns)
        problem += ("\n\nIf the columns have other names, say which column is which below (filled in where "
                    "the names tell), then **Apply mapping**.")
        boxes = [gr.update(choices=[NOT_IN_FILE, *columns], value=guess.get(t, NOT_IN_FILE)) for t in MAP_TARGETS]
        return _data_outputs(problems=problem, mapping=True, boxes=boxes)
    state = {"path": str(path), "columns": dict(column_map or {}), "name": name, "rows": report.rows_out,
             "n_desirable": report.n_desirable, "n_undesirable": report.n_undesirable,
             "weights": [report.desirable_weight, report.undesirable_weight],
             "chars": _chars(examples), "demo": demo if demo is not None else is_demo_data(path)}
    report.path = shown
    return _data_outputs(_summary(name, report), _preview(examples), _problems_markdown(report),
                         report.format(), boxes=[gr.skip()] * len(MAP_TARGETS), state=state)


# ---------------------------------------------------------------------- handlers
def on_upload(file_path: str | None = None):
    """A new upload: staged under runs/_data, then described. The last output is the mapping source."""
    if not file_path:
        return (*describe_data(None, ""), None)
    # The upload's name is only shown (escaped); where the file is kept comes from its content.
    shown = Path(file_path).name
    source = {"path": str(runs.stage_file(file_path)), "name": f"{shown} (uploaded)", "shown": shown}
    return (*describe_data(source["path"], source["name"], shown=shown), source)


def on_sample(choice: str | None):
    path = runs.sample_files().get(choice or "")
    source = {"path": str(path), "name": choice} if path else None
    return (*describe_data(path, choice or ""), source)


def on_feedback_file(choice: str | None):
    path = runs.feedback_files().get(choice or "")
    if not path:
        return (*describe_data(None, ""), None)
    source = {"path": str(runs.stage_file(path, "feedback-")), "name": f"feedback of {choice}", "shown": str(path)}
    demo = _rated_on_demo(path)
    return (*describe_data(source["path"], source["name"], shown=source["shown"], demo=demo), source)


def _rated_on_demo(feedback: Path) -> bool:
    """Whether a feedback file rates the demo model's answers: a run on it, or its base-model file."""
    from kto_lite.demo import DEMO_MODEL_DIR
    from kto_lite.runs import FEEDBACK_FILE, adapter_base

    if feedback.name != FEEDBACK_FILE:  # runs/_feedback/<model>.jsonl: "demo" is the demo model's
        return feedback.stem == "demo"
    base = adapter_base(feedback.parent, resolve=False)
    return not base or Path(base).resolve() == DEMO_MODEL_DIR.resolve()


def on_map_columns(source: dict | None, *targets: str):
    """Apply the mapping dropdowns (one per canonical column, each naming a file column or none)."""
    if not source:
        return _data_outputs(EMPTY)
    column_map = {col: target for target, col in zip(MAP_TARGETS, targets, strict=True)
                  if col and col != NOT_IN_FILE}
    return describe_data(source["path"], source["name"], column_map, shown=source.get("shown"))


def refresh_feedback_choices(current: str | None):
    return gr.update(choices=list(runs.feedback_files()), value=current)


# ---------------------------------------------------------------------- layout and wiring
@dataclass
class DataTab:
    state: gr.State  # what the Train tab trains on (describe_data)
    outputs: list  # what describe_data fills, state last
    source: gr.State  # the file chosen, for column mapping


def build(demo: gr.Blocks) -> DataTab:
    with gr.Tab("Data", id="data"):
        source_state = gr.State(None)  # the file last chosen, for column mapping
        data_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2):
                upload = gr.File(label="Upload labeled data (.jsonl .json .csv .tsv .parquet)", file_types=DATA_TYPES)
                sample = gr.Dropdown(choices=list(runs.sample_files()), value=None, label="…or a shipped sample")
                feedback = gr.Dropdown(choices=[], value=None, label="…or feedback from the Chat tab",
                                       info="Rated replies, one round of KTO after another.")
            with gr.Column(scale=3):
                summary = gr.Markdown(EMPTY)
                problems = gr.Markdown()
        with gr.Group(visible=False) as mapping:
            gr.Markdown("**Map columns:** which column of your file holds each part? Use prompt + completion "
                        "+ label, or messages + label, or chosen + rejected (+ prompt).")
            with gr.Row():
                map_boxes = [gr.Dropdown(choices=[NOT_IN_FILE], value=NOT_IN_FILE, label=t, min_width=120)
                             for t in MAP_TARGETS]
            map_button = gr.Button("Apply mapping", variant="primary")
        preview = gr.Dataframe(headers=["row", "label", "prompt", "completion"], label="Preview (first 50 examples)",
                               wrap=True, interactive=False, max_height=420, column_widths=["8%", "14%", "39%", "39%"])
        with gr.Accordion("Full data report", open=False):
            report = gr.Code(language=None, label="python -m kto_lite data", lines=8, show_line_numbers=False)

    outputs = [summary, preview, problems, report, mapping, *map_boxes, data_state]
    upload.upload(on_upload, upload, [*outputs, source_state], api_name="upload")
    upload.clear(on_upload, None, [*outputs, source_state], api_visibility="private")  # no error left behind
    sample.input(on_sample, sample, [*outputs, source_state], api_name="sample")
    feedback.input(on_feedback_file, feedback, [*outputs, source_state], api_name="feedback_data")
    feedback.focus(refresh_feedback_choices, feedback, feedback, api_visibility="private")
    map_button.click(on_map_columns, [source_state, *map_boxes], outputs, api_name="map_columns")
    demo.load(refresh_feedback_choices, feedback, feedback, api_visibility="private")
    return DataTab(state=data_state, outputs=outputs, source=source_state)
