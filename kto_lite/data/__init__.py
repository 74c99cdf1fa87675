"""Data: a labeled file in, token ids out; nothing here knows a model beyond its tokenizer.

    read.py      a file (.jsonl .json .csv .tsv .parquet, a saved dataset) -> raw rows, with row numbers
    load.py      raw rows -> `Example`s (format detection, labels, dropped rows) + a `DataReport`
    report.py    what was read, dropped and suggested (weights, warnings), printed by `kto_lite data`
    tokenize.py  `Example`s -> `TokenizedExample`s through the model's chat template, truncated
    examples.py  the two shapes an example takes
"""

from kto_lite.data.examples import Content, Example, TokenizedExample
from kto_lite.data.load import CANONICAL, load_data, normalize_label
from kto_lite.data.report import DataReport, complete_weights, suggest_weights
from kto_lite.data.tokenize import encode_prompt, tokenize

__all__ = ["CANONICAL", "Content", "DataReport", "Example", "TokenizedExample", "complete_weights", "encode_prompt",
           "load_data", "normalize_label", "suggest_weights", "tokenize"]
