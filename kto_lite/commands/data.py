"""`python -m kto_lite data FILE`: check a data file and print its report before training on it."""

from __future__ import annotations

from kto_lite.commands import cli
from kto_lite.config import TrainConfig
from kto_lite.data import load_data, tokenize
from kto_lite.data.lengths import length_problem
from kto_lite.errors import UsageError
from kto_lite.model import load_tokenizer

TOKENIZE_FIELDS = ["model", "revision", "trust_remote_code", "max_length", "max_prompt_length", "use_chat_template"]


def main(argv: list[str]) -> int:
    """Exit status: 0 report printed, 2 unusable data or arguments (or limits that `train` would refuse)."""
    parser = cli.Parser("data", "Read a labeled data file, detect its format and print a report: counts, label "
                        "balance, suggested weights, rows dropped and why, and token lengths when --model is given.")
    parser.add_argument("file", help="a .jsonl/.json/.csv/.tsv/.parquet file or a save_to_disk folder")
    parser.add_flag("json", metavar="OUT", help="also write the report as JSON to OUT")
    parser.add_config_fields(["columns", *TOKENIZE_FIELDS])  # --columns and --column NAME=CANONICAL, as train
    args = parser.parse_args(argv)
    return cli.run(lambda: report(args))


def report(args) -> int:

    overrides = cli.config_overrides(args)
    columns = TrainConfig.from_dict({"columns": overrides.pop("columns", {})}, source="flags").columns  # checked
    if overrides and not overrides.get("model"):
        raise UsageError(f"--{next(iter(overrides))} needs --model: token lengths need the model's tokenizer")
    examples, data_report = load_data(args.file, columns)
    problem = None
    if overrides.get("model"):

        config = TrainConfig.from_dict(overrides, source="flags").resolved()
        tokenizer = load_tokenizer(config.model, revision=config.revision, trust_remote_code=config.trust_remote_code)
        lengths = dict(max_length=config.max_length, max_prompt_length=config.max_prompt_length,
                       use_chat_template=config.use_chat_template)
        tokenize(examples, tokenizer, report=data_report, **lengths)
        problem = length_problem(examples, tokenizer, data_report, **lengths)  # what `train` would refuse
    print(data_report.format())
    if args.json:
        data_report.save(args.json)
        print(f"\nreport written to {args.json}")
    if problem:
        raise UsageError(f"train would refuse these limits: {problem}")
    return 0
