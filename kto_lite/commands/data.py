"""`python -m kto_lite data FILE`: check a data file and print its report before training on it."""

from __future__ import annotations

from kto_lite.commands import cli
from kto_lite.config import TrainConfig
from kto_lite.data import CANONICAL, load_data, tokenize
from kto_lite.errors import UsageError
from kto_lite.model import load_tokenizer

TOKENIZE_FIELDS = ["model", "revision", "trust_remote_code", "max_length", "max_prompt_length", "use_chat_template"]


def main(argv: list[str]) -> int:
    """Exit status: 0 report printed, 2 unusable data or arguments."""
    parser = cli.Parser("data", "Read a labeled data file, detect its format and print a report: counts, label "
                        "balance, suggested weights, rows dropped and why, and token lengths when --model is given.")
    parser.add_argument("file", help="a .jsonl/.json/.csv/.tsv/.parquet file or a save_to_disk folder")
    parser.add_flag("column", action="append", default=[], metavar="NAME=CANONICAL",
                    help=f"use column NAME as CANONICAL (one of {', '.join(CANONICAL)}); repeatable")
    parser.add_flag("json", metavar="OUT", help="also write the report as JSON to OUT")
    parser.add_config_fields(TOKENIZE_FIELDS)
    args = parser.parse_args(argv)
    return cli.run(lambda: report(args))


def report(args) -> int:

    column_map = {}
    for item in args.column:
        name, sep, canonical = item.partition("=")
        if not sep:
            raise UsageError(f"--column expects NAME=CANONICAL, got {item!r}")
        column_map[name.strip()] = canonical.strip()
    overrides = cli.config_overrides(args)
    if overrides and not overrides.get("model"):
        raise UsageError(f"--{next(iter(overrides))} needs --model: token lengths need the model's tokenizer")
    examples, data_report = load_data(args.file, column_map or None)
    if overrides.get("model"):

        config = TrainConfig.from_dict(overrides, source="flags").resolved()
        try:
            tokenizer = load_tokenizer(config.model, revision=config.revision,
                                       trust_remote_code=config.trust_remote_code)
        except OSError as e:
            raise UsageError(f"cannot load a tokenizer from {config.model!r} ({e})") from e
        tokenize(examples, tokenizer, max_length=config.max_length, max_prompt_length=config.max_prompt_length,
                 use_chat_template=config.use_chat_template, report=data_report)
    print(data_report.format())
    if args.json:
        data_report.save(args.json)
        print(f"\nreport written to {args.json}")
    return 0
