"""Labeled data in, clean examples out: `load_data` reads a file into `Example`s plus a `DataReport`.

Three formats, detected from the column names (docs/data.md has one literal line of each):
1. `prompt`, `completion`, `label`: strings, or chat message lists ([{"role", "content"}, ...]);
2. `messages` + `label` (or `kto_tag`): the final assistant message is the completion, the rest the prompt;
   per-turn labels: assistant messages that carry their own `label` ({"role": "assistant", "content": ...,
   "label": false}, chat logs with a thumb on every reply) give one example each, the conversation before
   them as the prompt; unlabelled assistant messages are context only; the `label` column, if any, is the
   final assistant message's label. A file of format 1 may also hold such `messages` rows (a chat feedback file);
3. `chosen`, `rejected` and optionally `prompt`: each row gives one desirable and one undesirable
   example with the same prompt. When chosen and rejected are conversations that begin with the same
   messages, those messages are the prompt (a `prompt` column is then ignored).
`column_map` renames the file's columns first, e.g. {"question": "prompt", "rating": "label"}.

Policies (also in docs/data.md):
- Problems that mean the file is misread (bad JSON, bad encoding, unknown labels, wrong value types)
  raise `DataError` naming the file, the row and the value; the first 20 such rows are listed.
- Rows that are readable but unusable are dropped and listed in the report with a reason: a field
  over MAX_FIELD_CHARS characters, an empty completion, a conversation not ending with an assistant
  message, chosen identical to rejected.
- Exact duplicates, empty prompts and contradictory labels are kept and reported.
Tokenization lives in tokenize.py, file reading in read.py, the report in report.py.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kto_lite.config import CANONICAL_COLUMNS
from kto_lite.data.examples import Content, Example
from kto_lite.data.read import RawData, Row, read_rows, snippet
from kto_lite.data.report import DataReport
from kto_lite.errors import DataError

MAX_FIELD_CHARS = 1_000_000  # longer fields are dropped: no model trains on a 250k-token completion
CANONICAL = CANONICAL_COLUMNS  # what `column_map` (TrainConfig.columns) may map a column to
TEXT_FIELDS = {  # the text columns each format reads; other columns are ignored
    "prompt_completion": ("prompt", "completion"),  # "prompt_completion+messages": per row, one of the two
    "messages": ("messages",),
    "paired": ("chosen", "rejected", "prompt"),
}
ACCEPTED_FORMATS = (
    "(1) prompt, completion, label; (2) messages, label (or kto_tag), or messages whose assistant messages carry a "
    "label; (3) chosen, rejected, optional prompt"
)
_TRUE = {"true", "1", "1.0", "yes", "desirable", "good", "up", "\N{THUMBS UP SIGN}"}
_FALSE = {"false", "0", "0.0", "no", "undesirable", "bad", "down", "\N{THUMBS DOWN SIGN}"}
_EMOJI_MODIFIERS = re.compile("[\ufe0e\ufe0f\U0001f3fb-\U0001f3ff]")  # variation selectors, skin tones
_MAX_ERRORS = 20

def normalize_label(value: Any) -> bool:
    """True for desirable, False for undesirable; ValueError for anything else.

    Accepts booleans, 1/0 (int, float or text), and case- and space-insensitive true/false, yes/no,
    desirable/undesirable, good/bad, up/down, 👍/👎 (with or without skin tones or variation selectors).
    """
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy / pandas scalar
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        key = _EMOJI_MODIFIERS.sub("", value).strip().casefold()
        if key in _TRUE:
            return True
        if key in _FALSE:
            return False
    raise ValueError(
        f"unknown label {snippet(value)}; accepted: true/false, 1/0, yes/no, desirable/undesirable, "
        "good/bad, up/down, 👍/👎"
    )


def load_data(
    path: str | os.PathLike, column_map: dict[str, str] | None = None
) -> tuple[list[Example], DataReport]:
    """Read a data file into examples and a report. The file is only read, never written.

    The list may be empty when every row was dropped: check `report.rows_out` and `report.warnings`.
    """
    raw = read_rows(Path(path))
    if column_map:
        _rename_columns(raw, column_map)
    fmt, label_column = _detect_format(raw)
    report = DataReport(
        path=raw.path, data_format=fmt, columns=raw.columns, row_unit=raw.unit, rows_in=len(raw.rows)
    )
    examples: list[Example] = []
    errors: list[DataError] = []
    n_errors = 0
    for row in raw.rows:
        try:
            examples += _row_examples(raw, row, fmt, label_column, report)
        except DataError as e:
            n_errors += 1
            if len(errors) < _MAX_ERRORS:
                errors.append(e)
    if errors:
        more = (
            f"\n... and {n_errors - len(errors)} more {raw.unit}s with problems"
            if n_errors > len(errors)
            else ""
        )
        first = errors[0]
        raise DataError(
            "\n".join(str(e) for e in errors) + more, path=raw.path, row=first.row, value=first.value
        )
    examples = [ex for ex in examples if not _empty_completion(ex, report)]
    report.conversational = any(isinstance(ex.prompt, list) for ex in examples)
    report.empty_prompt_rows = sorted({ex.row for ex in examples if _is_empty(ex.prompt)})
    report.duplicate_rows, report.conflicting_rows = _repeats(examples)
    report.set_counts([ex.label for ex in examples])
    return examples, report


# --- columns and formats ---


def _rename_columns(raw: RawData, column_map: dict[str, str]) -> None:
    for source, target in column_map.items():
        if target not in CANONICAL:
            raise DataError(
                f"columns: {target!r} is not one of {list(CANONICAL)}", path=raw.path, value=target
            )
        if source not in raw.columns:
            raise DataError(
                f"{raw.path}: columns (--column) maps column {source!r}, but the file's columns are "
                f"{raw.columns}",
                path=raw.path,
                value=source,
            )
    for row in raw.rows:
        renamed = {column_map[k]: v for k, v in row.data.items() if k in column_map}
        row.data = {k: v for k, v in row.data.items() if k not in column_map and k not in renamed} | renamed
    raw.columns = list(dict.fromkeys(column_map.get(c, c) for c in raw.columns))


def _detect_format(raw: RawData) -> tuple[str, str | None]:
    columns = set(raw.columns)
    label = "label" if "label" in columns else "kto_tag" if "kto_tag" in columns else None
    if {"prompt", "completion"} <= columns and label:
        return ("prompt_completion+messages" if "messages" in columns else "prompt_completion"), label
    if "messages" in columns and (label or _has_turn_labels(raw)):
        return "messages", label
    if {"chosen", "rejected"} <= columns:
        return "paired", None
    hint = ""
    if not label and ({"prompt", "completion"} <= columns or "messages" in columns):
        hint = " The label column ('label' or 'kto_tag') is missing."
    raise DataError(
        f"{raw.path}: cannot tell the data format from the columns found: {raw.columns}.{hint} "
        f"Accepted formats: {ACCEPTED_FORMATS}. Rename the columns, or map them: the config's `columns` "
        "(YAML: columns: {question: prompt, answer: completion, rating: label}), or on the command line "
        "of train and data: --column question=prompt --column answer=completion --column rating=label.",
        path=raw.path,
        value=raw.columns,
    )


# --- one row -> examples ---


def _row_examples(
    raw: RawData, row: Row, fmt: str, label_column: str | None, report: DataReport
) -> list[Example]:
    def error(message: str, value: Any) -> DataError:
        return DataError(f"{raw.path}, {raw.where(row)}: {message}", path=raw.path, row=row.row, value=value)

    data = row.data
    if fmt == "prompt_completion+messages":  # a chat feedback file: rated replies, and conversations
        fmt = "messages" if data.get("messages") is not None and data.get("prompt") is None else "prompt_completion"
    optional = {"prompt"} if fmt == "paired" else set()
    fields = {
        k: read_content(data.get(k), k, error)
        for k in TEXT_FIELDS[fmt]
        if k not in optional or data.get(k) is not None
    }
    if fmt == "prompt_completion" or fmt == "messages":
        value = row.data.get(label_column) if label_column else None
        if value is None and fmt == "messages" and (label_column is None or _has_labels(fields["messages"])):
            label = None  # the labels are on the messages (a conversation without any is dropped and reported)
        else:
            try:
                label = normalize_label(value)
            except ValueError as e:
                raise error(f"'{label_column}': {e}", value) from None
    too_long = [k for k, v in fields.items() if _chars(v) > MAX_FIELD_CHARS]
    if too_long:
        report.drop(f"a field over {MAX_FIELD_CHARS:,} characters", row.row)
        return []
    if fmt == "prompt_completion":
        return [_example(fields["prompt"], fields["completion"], label, row.row)]
    if fmt == "messages":
        messages = fields["messages"]
        if not isinstance(messages, list):
            raise error("'messages' must be a list of {'role': ..., 'content': ...} messages", messages)
        return _turn_examples(messages, label, row.row, error, report)
    return _paired_examples(fields, row.row, error, report)


def _turn_examples(messages: list[dict], label: bool | None, row: int, error, report: DataReport) -> list[Example]:
    """A conversation -> one example per labelled assistant message, with the conversation before it as the prompt.

    A message's own `label` labels it; `label` (the row's label column) labels the final message, which must then
    be an assistant message (and agree with that message's own label, if it has one). Assistant messages without
    a label are context. Labels are taken off the messages the examples hold.
    """
    labels: dict[int, bool] = {}
    for i, m in enumerate(messages):
        if "label" not in m:
            continue
        if m["role"] != "assistant":
            raise error(f"message {i + 1} is a {m['role']!r} message with a label; only assistant replies are "
                        "labelled", m)
        try:
            labels[i] = normalize_label(m["label"])
        except ValueError as e:
            raise error(f"message {i + 1}, 'label': {e}", m["label"]) from None
    if label is not None:
        last = len(messages) - 1
        if not messages or messages[-1]["role"] != "assistant":
            report.drop("the conversation does not end with an assistant message", row)
            return []
        if labels.get(last, label) != label:
            raise error(f"the row's label ({label}) contradicts the label of its final message ({labels[last]})",
                        messages[-1])
        labels[last] = label
    if not labels:
        report.drop("no labelled assistant message", row)
        return []
    plain = [{k: v for k, v in m.items() if k != "label"} for m in messages]
    turn = {i: n for n, i in enumerate((i for i, m in enumerate(messages) if m["role"] == "assistant"), start=1)}
    report.add_conversation(len(turn), [(turn[i], labels[i]) for i in sorted(labels)],
                            per_turn=any("label" in m for m in messages))
    return [Example(plain[:i], [plain[i]], labels[i], row) for i in sorted(labels)]


def _has_labels(messages: Any) -> bool:
    return isinstance(messages, list) and any(isinstance(m, dict) and m.get("label") is not None for m in messages)


def _has_turn_labels(raw: RawData) -> bool:
    """Whether any row's `messages` carries a label on a message (per-turn labels, no label column needed)."""
    def decoded(value):
        if isinstance(value, str) and value.lstrip().startswith("[{"):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return None
        return value

    return any(_has_labels(decoded(row.data.get("messages"))) for row in raw.rows)


def _paired_examples(fields: dict[str, Content], row: int, error, report: DataReport) -> list[Example]:
    chosen, rejected, prompt = fields["chosen"], fields["rejected"], fields.get("prompt")
    if chosen == rejected:
        report.drop("chosen and rejected are identical", row)
        return []
    if isinstance(chosen, list) and isinstance(rejected, list):
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared:  # the conversations carry their prompt: the messages both begin with
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    if prompt is None:
        raise error(
            "no 'prompt' column, and 'chosen' and 'rejected' are not conversations that begin with the same "
            "messages; add a prompt column",
            fields["chosen"],
        )
    return [_example(prompt, chosen, True, row), _example(prompt, rejected, False, row)]


def _example(prompt: Content, completion: Content, label: bool, row: int) -> Example:
    """Message lists on one side make the example conversational: wrap the other side's text too."""
    if isinstance(prompt, list) or isinstance(completion, list):
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
    return Example(prompt, completion, label, row)


def read_content(value: Any, name: str, error: Callable[[str, Any], DataError]) -> Content:
    """Text, or a list of chat messages (a JSON-encoded list in a CSV cell counts as one): the one rule for a
    prompt, completion or conversation cell, for training data and prompt files alike. `error(message,
    value)` makes the DataError that names the file and row."""
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            decoded = None
        if isinstance(decoded, list) and all(_is_message(m) for m in decoded):
            value = decoded
    if isinstance(value, str):
        return value
    if value is None:
        raise error(f"'{name}' is missing or null", value)
    if isinstance(value, list):
        bad = next((m for m in value if not _is_message(m)), None)
        if bad is None:  # drop keys that Parquet/Arrow filled with None for other rows' schemas
            return [{k: v for k, v in m.items() if v is not None} for m in value]
        raise error(
            f"'{name}' has a message that is not {{'role': str, 'content': str}}: {snippet(bad)}", bad
        )
    raise error(
        f"'{name}' must be text or a list of {{'role', 'content'}} messages, got {snippet(value)}", value
    )


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def _chars(value: Content) -> int:
    return len(value) if isinstance(value, str) else sum(len(m["content"]) for m in value)


def _is_empty(value: Content) -> bool:
    return not value.strip() if isinstance(value, str) else not any(m["content"].strip() for m in value)


def _empty_completion(ex: Example, report: DataReport) -> bool:
    if not _is_empty(ex.completion):
        return False
    report.empty_completion_rows.append(ex.row)
    report.drop("empty completion", ex.row)
    return True


def _repeats(examples: list[Example]) -> tuple[list[list[int]], list[list[int]]]:
    """Groups of rows holding identical examples, and groups whose prompt+completion carry both labels."""
    same: dict[str, list[int]] = {}
    labels: dict[str, dict[bool, list[int]]] = {}
    for ex in examples:
        pair = json.dumps([ex.prompt, ex.completion], sort_keys=True, ensure_ascii=False)
        same.setdefault(pair + str(ex.label), []).append(ex.row)
        labels.setdefault(pair, {}).setdefault(ex.label, []).append(ex.row)
    duplicates = [rows for rows in same.values() if len(rows) > 1]
    conflicts = [sorted(set(by[True] + by[False])) for by in labels.values() if len(by) == 2]
    return duplicates, conflicts
