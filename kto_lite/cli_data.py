"""`python -m kto_lite data FILE`: check a data file and print its report before training on it."""

from __future__ import annotations

import argparse
import sys

from kto_lite.config import TrainConfig
from kto_lite.data import CANONICAL, DataError, load_data, tokenize


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m kto_lite data",
        description="Read a labeled data file, detect its format and print a report: counts, label balance, "
        "suggested weights, rows dropped and why, and token lengths when --model is given.",
    )
    parser.add_argument("file", help="a .jsonl/.json/.csv/.tsv/.parquet file or a save_to_disk folder")
    parser.add_argument(
        "--model", metavar="PATH", help="tokenize with this model's tokenizer (hub id or folder)"
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=defaults.max_length,
        metavar="N",
        help=f"prompt+completion token limit (default {defaults.max_length})",
    )
    parser.add_argument(
        "--max-prompt-length",
        type=int,
        default=defaults.max_prompt_length,
        metavar="N",
        help=f"prompt token limit; longer prompts keep their end (default {defaults.max_prompt_length})",
    )
    parser.add_argument(
        "--no-chat-template",
        action="store_true",
        help="tokenize plain-text prompts without the chat template",
    )
    parser.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="NAME=CANONICAL",
        help=f"use column NAME as CANONICAL (one of {', '.join(CANONICAL)}); repeatable",
    )
    parser.add_argument("--json", metavar="OUT", help="also write the report as JSON to OUT")
    return parser


def main(argv: list[str]) -> int:
    """Exit status: 0 report printed, 2 unusable data or arguments."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help or a usage error; argparse already printed
        return int(e.code or 0)
    column_map = {}
    for item in args.column:
        name, sep, canonical = item.partition("=")
        if not sep:
            print(f"error: --column expects NAME=CANONICAL, got {item!r}", file=sys.stderr)
            return 2
        column_map[name.strip()] = canonical.strip()
    try:
        examples, report = load_data(args.file, column_map or None)
        if args.model:
            tokenize(
                examples,
                _load_tokenizer(args.model),
                max_length=args.max_length,
                max_prompt_length=args.max_prompt_length,
                use_chat_template=False if args.no_chat_template else None,
                report=report,
            )
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.format())
    if args.json:
        report.save(args.json)
        print(f"\nreport written to {args.json}")
    return 0


def _load_tokenizer(model: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except Exception as e:  # transformers raises OSError, ValueError, ... for a path it cannot use
        raise OSError(f"cannot load a tokenizer from {model!r} ({e})") from e
