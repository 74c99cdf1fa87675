"""Read a data file into numbered rows; every error names the file, the row and the value.

This module only reads: it turns a .jsonl / .json / .csv / .tsv / .parquet file or a folder saved with
`datasets.Dataset.save_to_disk` into `Row`s (a number a person can find in the file, plus a dict).
What the columns mean is `data.py`'s job. Nothing here ever writes to the input.

Row numbers, 1-based, as a person counts them (`RowUnit` says which kind a file uses):
- .jsonl: the line number (blank lines are skipped but still counted);
- .json list: the item number, with the line the item starts on;
- .csv / .tsv: the data row number (the header is not a data row), with the line it starts on;
- .parquet and saved datasets: the row number.

JSON and CSV are parsed with the standard library rather than `datasets`, because only a parser that
reads line by line can say which line a broken row is on (and `datasets` would also copy the file
into its cache). Parquet goes through pyarrow and saved folders through `datasets.load_from_disk`.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kto_lite.errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
_WS = re.compile(r"\s*")


@dataclass
class Row:
    row: int  # 1-based; see the module docstring for what it counts
    line: int | None  # line the row starts on, for text files
    data: dict[str, Any]


@dataclass
class RawData:
    path: str
    unit: str  # "line", "item", "data row" or "row": what `Row.row` counts
    rows: list[Row]
    columns: list[str]  # in order of first appearance

    def where(self, row: Row) -> str:
        """'line 7', 'data row 3 (line 4)', 'item 2 (line 5)' or 'row 9'."""
        if self.unit == "line" or row.line is None:
            return f"{self.unit} {row.row}"
        return f"{self.unit} {row.row} (line {row.line})"


def snippet(value: Any, limit: int = 80) -> str:
    """repr() of a value, shortened so that an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'" + f" ({len(text):,} characters)"


def read_rows(path: str | Path) -> RawData:
    """Read every row of a data file or saved dataset folder, without interpreting the columns."""
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise DataError(f"{name}: no such file or folder", path=name)
    if p.is_dir():
        rows, unit = _read_saved_dataset(p, name), "row"
    else:
        suffix = p.suffix.lower()
        if suffix not in SUFFIXES:
            raise DataError(
                f"{name}: unsupported file type {suffix or '(none)'!r}; accepted: {', '.join(SUFFIXES)} "
                "or a folder saved with datasets.Dataset.save_to_disk",
                path=name,
                value=suffix,
            )
        if suffix == ".parquet":
            rows, unit = _read_parquet(p, name), "row"
        else:
            text = _decode_utf8(p.read_bytes(), name)
            if not text.strip():
                raise DataError(f"{name}: the file is empty", path=name)
            if suffix in (".csv", ".tsv"):
                rows, unit = _read_csv(text, name, "\t" if suffix == ".tsv" else ","), "data row"
            elif suffix == ".json" and text.lstrip().startswith("["):
                rows, unit = _read_json_list(text, name), "item"
            else:  # .jsonl, or JSON lines saved under a .json name
                rows, unit = _read_json_lines(text, name), "line"
    if not rows:
        raise DataError(f"{name}: the file has no data rows", path=name)
    columns = list(dict.fromkeys(key for row in rows for key in row.data))
    return RawData(name, unit, rows, columns)


def _decode_utf8(raw: bytes, name: str) -> str:
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0  # Excel writes a BOM
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        line = raw.count(b"\n", 0, offset) + 1
        bad = raw[offset : offset + 4]
        raise DataError(
            f"{name}, line {line}: not valid UTF-8 at byte offset {offset} (bytes {bad!r}); "
            "save the file as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet program)",
            path=name,
            row=line,
            value=bad,
        ) from None


def _object_or_error(value: Any, name: str, where: str, row: int) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(
            f'{name}, {where}: expected a JSON object like {{"prompt": ..., "completion": ..., '
            f'"label": ...}}, got {type(value).__name__} {snippet(value)}',
            path=name,
            row=row,
            value=value,
        )
    return value


def _read_json_lines(text: str, name: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 may be in a string
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{name}, line {number}: malformed JSON ({e.msg} at column {e.colno}): {snippet(line)}",
                path=name,
                row=number,
                value=line,
            ) from None
        rows.append(Row(number, number, _object_or_error(value, name, f"line {number}", number)))
    return rows


def _read_json_list(text: str, name: str) -> list[Row]:
    """Parse `[{...}, {...}]` one item at a time so that each row knows the line it starts on."""
    decoder = json.JSONDecoder()
    rows: list[Row] = []
    i = _WS.match(text, text.index("[") + 1).end()
    line, counted_to = 1, 0
    while i < len(text) and text[i] != "]":
        line += text.count("\n", counted_to, i)  # incremental: O(file), not O(rows * file)
        counted_to = i
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            bad_line = text.split("\n")[e.lineno - 1]
            raise DataError(
                f"{name}, line {e.lineno}: malformed JSON ({e.msg} at column {e.colno}): {snippet(bad_line)}",
                path=name,
                row=e.lineno,
                value=bad_line,
            ) from None
        item = len(rows) + 1
        rows.append(Row(item, line, _object_or_error(value, name, f"item {item} (line {line})", item)))
        i = _WS.match(text, i).end()
        if i < len(text) and text[i] == ",":
            i = _WS.match(text, i + 1).end()
        elif i >= len(text) or text[i] != "]":
            bad = text.count("\n", 0, i) + 1
            raise DataError(
                f"{name}, line {bad}: malformed JSON (expected ',' or ']' after item {item}): "
                f"{snippet(text[i : i + 40])}",
                path=name,
                row=bad,
                value=text[i : i + 40],
            )
    if i >= len(text) or text[_WS.match(text, i + 1).end() :]:
        bad = text.count("\n", 0, min(i, len(text))) + 1
        raise DataError(
            f"{name}, line {bad}: malformed JSON (the list is not closed, or text follows it)",
            path=name,
            row=bad,
        )
    return rows


def _read_csv(text: str, name: str, delimiter: str) -> list[Row]:
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # the default (131,072) would reject long texts; data.py checks sizes
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        try:
            header = next(reader)
        except csv.Error as e:
            raise DataError(f"{name}, line 1: malformed CSV header ({e})", path=name, row=1) from None
        header = [column.strip() for column in header]
        repeated = sorted({column for column in header if header.count(column) > 1})
        if repeated:
            raise DataError(
                f"{name}, line 1: the header repeats column(s) {repeated}", path=name, row=1, value=repeated
            )
        rows: list[Row] = []
        line_after = reader.line_num
        for record in _csv_records(reader, name):
            start, line_after = line_after + 1, reader.line_num
            if not any(cell.strip() for cell in record):
                continue  # blank line
            number = len(rows) + 1
            if len(record) != len(header):
                raise DataError(
                    f"{name}, data row {number} (line {start}): {len(record)} fields but the header has "
                    f"{len(header)} ({', '.join(header)}); quote fields that contain {delimiter!r}",
                    path=name,
                    row=number,
                    value=record,
                )
            rows.append(Row(number, start, dict(zip(header, record))))
        return rows
    finally:
        csv.field_size_limit(limit)


def _csv_records(reader, name: str):
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            line = reader.line_num
            raise DataError(f"{name}, line {line}: malformed CSV ({e})", path=name, row=line) from None


def _read_parquet(p: Path, name: str) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        if p.stat().st_size == 0:
            raise DataError(f"{name}: the file is empty", path=name) from None
        raise DataError(f"{name}: cannot read as Parquet ({e})", path=name) from None
    return [Row(i, None, record) for i, record in enumerate(records, start=1)]


def _read_saved_dataset(p: Path, name: str) -> list[Row]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(p))
    except Exception as e:  # FileNotFoundError or a datasets error for a folder that is not a dataset
        raise DataError(
            f"{name}: a folder must be a dataset saved with datasets.Dataset.save_to_disk ({e})", path=name
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(splits) == 1:
            loaded = loaded[splits[0]]
        else:
            raise DataError(f"{name}: the saved dataset has splits {splits} and none is 'train'", path=name)
    return [Row(i, None, record) for i, record in enumerate(loaded.to_list(), start=1)]
