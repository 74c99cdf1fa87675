"""DataReport: what was read, what was dropped and why, and what to set before training.

`load_data` fills the first part, `tokenize` the token statistics. The report is saved as
`data_report.json` in every run's output_dir and printed by `python -m kto_lite data FILE`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = {
    "prompt_completion": "prompt / completion / label",
    "messages": "messages + label (last assistant message is the completion)",
    "prompt_completion+messages": "prompt / completion / label rows and messages rows (a chat feedback file)",
    "paired": "paired chosen / rejected (one desirable + one undesirable example per row)",
}
PER_TURN_FORMAT = "messages, labels on the assistant messages (one example per labelled reply)"
ONE_SIDED_ADVICE = "KTO can train on one side; use a conservative learning rate"


def suggest_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight) so that lambda_D*n_D / (lambda_U*n_U) lies in [1, 4/3].

    This is the KTO paper's eq. 8 recommendation. The rule: the larger weight stays 1.0 and the other
    is scaled down as little as possible to bring the ratio into range, so the loss keeps its usual
    scale:
    - ratio n_D/n_U already in [1, 4/3]: (1.0, 1.0);
    - fewer desirable (n_D/n_U < 1): lambda_D = 1, lambda_U = n_D/n_U (ratio exactly 1);
    - many more desirable (n_D/n_U > 4/3): lambda_U = 1, lambda_D = (4/3) * n_U/n_D (ratio exactly 4/3).
    One-sided or empty data gives (1.0, 1.0): there is nothing to balance.
    """
    if n_desirable <= 0 or n_undesirable <= 0:
        return 1.0, 1.0
    ratio = n_desirable / n_undesirable
    if ratio < 1:
        return 1.0, ratio
    if ratio > 4 / 3:
        return (4 / 3) / ratio, 1.0
    return 1.0, 1.0


def complete_weights(desirable: float | str, undesirable: float | str, n_desirable: int,
                     n_undesirable: int) -> tuple[float, float]:
    """The weights to train with when one or both are 'auto': both -> `suggest_weights`; one -> the
    value nearest 1.0 that brings lambda_D*n_D / (lambda_U*n_U) into [1, 4/3] given the one that was set."""
    if desirable == "auto" and undesirable == "auto":
        return suggest_weights(n_desirable, n_undesirable)
    if "auto" not in (desirable, undesirable) or n_desirable <= 0 or n_undesirable <= 0:
        return tuple(1.0 if w == "auto" else float(w) for w in (desirable, undesirable))
    if undesirable == "auto":  # lambda_U in [lambda_D*n_D / (4/3 n_U), lambda_D*n_D / n_U]
        low, high = desirable * n_desirable / (4 / 3 * n_undesirable), desirable * n_desirable / n_undesirable
        return float(desirable), min(max(1.0, low), high)
    low, high = undesirable * n_undesirable / n_desirable, 4 / 3 * undesirable * n_undesirable / n_desirable
    return min(max(1.0, low), high), float(undesirable)


def length_stats(lengths: list[int]) -> dict[str, float]:
    """min / mean / p50 / p95 / max of token counts (percentiles linearly interpolated)."""
    if not lengths:
        return {}
    import numpy as np

    a = np.asarray(lengths, dtype=np.float64)
    return {
        "min": int(a.min()),
        "mean": round(float(a.mean()), 1),
        "p50": round(float(np.percentile(a, 50)), 1),
        "p95": round(float(np.percentile(a, 95)), 1),
        "max": int(a.max()),
    }


@dataclass
class DataReport:
    path: str
    data_format: str = ""  # a key of FORMATS (not `format`: that name is the method below)
    conversational: bool = False  # prompts/completions are chat message lists
    columns: list[str] = field(default_factory=list)  # as found in the file
    row_unit: str = "row"  # what row numbers count: "line", "item", "data row" or "row"
    rows_in: int = 0  # rows read from the file
    rows_out: int = 0  # examples kept (a paired row gives two)
    n_desirable: int = 0
    n_undesirable: int = 0
    desirable_weight: float = 1.0  # suggested lambda_D (suggest_weights)
    undesirable_weight: float = 1.0  # suggested lambda_U
    duplicate_rows: list[list[int]] = field(default_factory=list)  # groups of identical examples
    conflicting_rows: list[list[int]] = field(default_factory=list)  # same prompt+completion, both labels
    empty_prompt_rows: list[int] = field(default_factory=list)  # kept
    empty_completion_rows: list[int] = field(default_factory=list)  # dropped
    dropped: dict[str, list[int]] = field(default_factory=dict)  # reason -> row numbers
    warnings: list[str] = field(default_factory=list)  # rebuilt by refresh()
    # --- filled by tokenize() ---
    tokenized: bool = False
    chat_template: bool | None = None  # whether the tokenizer's chat template was used
    max_length: int | None = None
    max_prompt_length: int | None = None
    prompt_tokens: dict[str, float] = field(default_factory=dict)  # stats before truncation
    completion_tokens: dict[str, float] = field(default_factory=dict)  # stats before truncation
    truncated_prompts: int = 0
    truncated_completions: int = 0
    dropped_no_completion: int = 0  # no completion token left after truncation
    prefix_mismatches: int = 0  # rows whose templated prompt was not a token prefix of the whole
    # --- conversations (messages rows), filled by load_data ---
    conversations: int = 0  # messages rows that gave examples
    per_turn_labels: bool = False  # some assistant messages carry their own label
    assistant_turns: list[int] = field(default_factory=list)  # [n]: conversations with n assistant turns (index n)
    labels_by_turn: dict[str, list[int]] = field(default_factory=dict)  # "1": [desirable, undesirable] of 1st replies
    missing_eos: bool = False  # the tokenizer has no EOS token: the model cannot learn to stop

    def add_conversation(self, turns: int, labels: list[tuple[int, bool]], per_turn: bool) -> None:
        """One conversation: its number of assistant turns, (turn number, label) of each labelled one, and whether
        any label was on a message (per-turn labels) rather than in the row's label column."""
        self.conversations += 1
        self.per_turn_labels |= per_turn
        self.assistant_turns += [0] * (turns + 1 - len(self.assistant_turns))
        self.assistant_turns[turns] += 1
        for turn, label in labels:
            counts = self.labels_by_turn.setdefault(str(turn), [0, 0])
            counts[0 if label else 1] += 1

    def drop(self, reason: str, row: int) -> None:
        self.dropped.setdefault(reason, []).append(row)

    def set_counts(self, labels: list[bool]) -> None:
        """Update counts and suggested weights from the labels of the examples kept."""
        self.rows_out = len(labels)
        self.n_desirable = sum(labels)
        self.n_undesirable = self.rows_out - self.n_desirable
        self.desirable_weight, self.undesirable_weight = suggest_weights(self.n_desirable, self.n_undesirable)
        self.refresh()

    def refresh(self) -> None:
        """Rebuild `warnings` from the numbers above (called after loading and after tokenizing)."""
        w = []
        rows = _rows_text
        if self.rows_out == 0:
            w.append("No usable examples are left.")
        elif self.n_undesirable == 0:
            w.append(f"Only desirable examples ({self.n_desirable}): {ONE_SIDED_ADVICE}.")
        elif self.n_desirable == 0:
            w.append(f"Only undesirable examples ({self.n_undesirable}): {ONE_SIDED_ADVICE}.")
        elif (self.desirable_weight, self.undesirable_weight) != (1.0, 1.0):
            w.append(
                f"Labels are imbalanced ({self.n_desirable} desirable : {self.n_undesirable} undesirable); "
                f"suggested desirable_weight={self.desirable_weight:.4g}, "
                f"undesirable_weight={self.undesirable_weight:.4g} (what training's default 'auto' uses)."
            )
        for reason, dropped in self.dropped.items():
            w.append(f"Dropped {len(dropped)} {self.row_unit}(s), {reason}: {rows(dropped)}.")
        if self.duplicate_rows:
            extra = sum(len(group) - 1 for group in self.duplicate_rows)
            w.append(f"{extra} example(s) repeat an earlier one exactly (kept): {_groups_text(self.duplicate_rows)}.")
        if self.conflicting_rows:
            w.append(f"The same prompt and completion are labeled both ways: {_groups_text(self.conflicting_rows)}.")
        if self.empty_prompt_rows:
            w.append(f"{len(self.empty_prompt_rows)} empty prompt(s) (kept): {rows(self.empty_prompt_rows)}.")
        if self.truncated_prompts:
            w.append(
                f"{self.truncated_prompts} prompt(s) longer than max_prompt_length={self.max_prompt_length} "
                "lost their beginning."
            )
        if self.truncated_completions:
            w.append(
                f"{self.truncated_completions} completion(s) cut at max_length={self.max_length}: "
                "they lose their end-of-turn token."
            )
        if self.prefix_mismatches:
            w.append(
                f"{self.prefix_mismatches} row(s): the templated prompt was not a token prefix of the "
                "templated conversation; prompt and completion were tokenized separately."
            )
        if self.missing_eos:
            w.append(
                "The tokenizer has no EOS token: completions end only where the chat template ends a turn."
            )
        self.warnings = w

    def _conversation_rows(self) -> list[tuple[str, Any]]:
        """The table's rows about conversations: turns per conversation and labels per turn (messages rows only)."""
        if not self.conversations:
            return []
        by_turn = "; ".join(f"turn {t}: {d} desirable / {u} undesirable"
                            for t, (d, u) in sorted(self.labels_by_turn.items(), key=lambda item: int(item[0])))
        return [("conversations", f"{self.conversations} ({_turns_text(self.assistant_turns)} assistant)"),
                ("labels per turn", by_turn)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataReport:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(
            json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )

    def format(self) -> str:
        """A readable table, as printed by `python -m kto_lite data`."""
        rows = [
            ("file", self.path),
            (
                "format",
                (PER_TURN_FORMAT if self.per_turn_labels and self.data_format == "messages"
                 else FORMATS.get(self.data_format, self.data_format))
                + (", chat messages" if self.conversational else ""),
            ),
            ("columns", ", ".join(self.columns)),
            (f"{self.row_unit}s read", self.rows_in),
            ("examples kept", self.rows_out),
            ("desirable", f"{self.n_desirable} ({_pct(self.n_desirable, self.rows_out)})"),
            ("undesirable", f"{self.n_undesirable} ({_pct(self.n_undesirable, self.rows_out)})"),
            (
                "suggested weights",
                f"desirable_weight={self.desirable_weight:.4g}, "
                f"undesirable_weight={self.undesirable_weight:.4g}",
            ),
            *self._conversation_rows(),
            ("duplicates", sum(len(g) - 1 for g in self.duplicate_rows)),
            ("empty prompts", len(self.empty_prompt_rows)),
            ("empty completions", f"{len(self.empty_completion_rows)} (dropped)"),
            ("dropped", sum(len(r) for r in self.dropped.values())),
        ]
        if self.tokenized:
            rows += [
                ("chat template", "used" if self.chat_template else "not used"),
                ("limits", f"max_length={self.max_length}, max_prompt_length={self.max_prompt_length}"),
                ("prompt tokens", _stats_text(self.prompt_tokens)),
                ("completion tokens", _stats_text(self.completion_tokens)),
                ("truncated prompts", self.truncated_prompts),
                ("truncated completions", self.truncated_completions),
                ("no completion left", f"{self.dropped_no_completion} (dropped)"),
            ]
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        if self.warnings:
            lines += ["", "warnings:"] + [f"  - {w}" for w in self.warnings]
        return "\n".join(lines)


def _turns_text(counts: list[int]) -> str:
    """[0, 3, 1] -> '1 turn: 3, 2 turns: 1' (conversations by their number of assistant turns)."""
    return ", ".join(f"{n} turn{'s' if n > 1 else ''}: {c}" for n, c in enumerate(counts) if c)


def _rows_text(rows: list[int], limit: int = 10) -> str:
    shown = ", ".join(map(str, rows[:limit]))
    return shown + (f" ... ({len(rows)} in all)" if len(rows) > limit else "")


def _groups_text(groups: list[list[int]], limit: int = 5) -> str:
    """'1, 7; 2, 9 ... and 3 more groups': the first groups of row numbers, and how many were left out."""
    shown = "; ".join(_rows_text(g) for g in groups[:limit])
    return shown + (f" ... and {len(groups) - limit} more group(s)" if len(groups) > limit else "")


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.1f}%" if total else "-"


def _stats_text(stats: dict[str, float]) -> str:
    if not stats:
        return "-"
    return "  ".join(f"{k} {v:g}" for k, v in stats.items())
