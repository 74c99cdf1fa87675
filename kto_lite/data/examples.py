"""The two shapes a training example takes: as read from a file (`Example`), and as token ids
(`TokenizedExample`). data.py makes the first, data_tokenize.py turns it into the second."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Content = str | list[dict[str, Any]]  # text, or chat messages [{"role", "content"}, ...]


@dataclass
class Example:
    prompt: Content  # text, or the chat messages before the completion
    completion: Content  # text, or the assistant message(s)
    label: bool  # True: desirable
    row: int  # 1-based row in the source file (DataReport.row_unit says what it counts)


@dataclass
class TokenizedExample:
    prompt_ids: list[int]
    completion_ids: list[int]  # ends with EOS / end-of-turn unless truncated
    label: bool
    row: int
