"""`python -m kto_lite loop`: rounds of sample -> judge -> train -> evaluate, one run folder per round.

    python -m kto_lite loop CONFIG.yaml --rounds 3 --prompts TRAIN.jsonl --eval_prompts HELDOUT.jsonl
                            --judge SPEC [--n 4] [--eval_n 4] [--FIELD VALUE ...]

What a round does and where it writes: kto_lite/feedback/loop.py.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import yaml

from kto_lite.commands import cli
from kto_lite.commands.sample import add_judge_flags, add_sampling_flags, sample_args
from kto_lite.config import REFERENCES, TrainConfig
from kto_lite.errors import UsageError
from kto_lite.feedback.loop import LEARNING_RATE_DECAY, LoopArgs, LoopStopped, round_dir, run_loop
from kto_lite.judges import INTERVAL


def _loop_config(args) -> tuple[TrainConfig, str]:
    """The config file plus flags, with `reference` taken out: for a loop it says what rounds that start
    from an adapter refer to, which a config cannot say for round 1 before there is an adapter."""
    overrides = cli.config_overrides(args)
    reference = overrides.pop("reference", None)
    if reference is None and args.config and Path(args.config).is_file():
        with contextlib.suppress(yaml.YAMLError, AttributeError):  # TrainConfig.load reports a bad file
            reference = yaml.safe_load(Path(args.config).read_text()).get("reference")
    reference = reference or "base"
    if reference not in REFERENCES:
        raise UsageError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
    config = TrainConfig.load(args.config, {**overrides, "reference": "base"})
    if config.data:
        raise UsageError("`data` is made by the loop (each round's samples); remove it from the config")
    if config.columns:
        raise UsageError("`columns` renames a data file's columns, and the loop writes its own data (prompt, "
                         "completion, label); remove it from the config")
    return config, reference


def main(argv: list[str]) -> int:
    parser = cli.Parser("loop", __doc__.split("\n\n")[0].strip("`"))
    parser.add_argument("config", nargs="?", help="a training config (YAML); `data` is made by each round")
    parser.add_flag("rounds", type=int, required=True, help="number of rounds (a finished loop can be extended)")
    parser.add_flag("prompts", required=True, help="training prompts (with reference answers for the judge)")
    parser.add_flag("eval_prompts", required=True, help="held-out prompts for the accuracy of each round")
    add_sampling_flags(parser, seed=False)
    parser.add_flag("eval_n", type=int, help="samples per held-out prompt (default: --n)")
    parser.add_flag("sample_batch_size", type=int, default=32, help="sequences generated together (default 32)")
    add_judge_flags(parser, required=True)
    parser.add_flag("eval_judge", metavar="SPEC", help="the judge of the held-out accuracy (default: --judge)")
    parser.add_flag("learning_rate_decay", type=float, default=LEARNING_RATE_DECAY,
                    help="round r trains at learning_rate x this^(r-1) (default 0.5; 1: the same rate every round)")
    parser.add_config_fields(exclude=("data", "columns"))  # each round's data is the loop's own samples
    args = parser.parse_args(argv)

    def body() -> int:
        config, reference = _loop_config(args)
        if args.rounds < 1 or (args.eval_n is not None and args.eval_n < 1) or args.sample_batch_size < 1:
            raise UsageError("--rounds, --eval_n and --sample_batch_size must be at least 1")
        if not 0 < args.learning_rate_decay <= 1:
            raise UsageError(f"--learning_rate_decay must be in (0, 1], got {args.learning_rate_decay}")
        args.seed = config.seed
        loop_args = LoopArgs(args.rounds, args.prompts, args.eval_prompts, sample_args(args),
                             args.eval_n or args.n, args.sample_batch_size, args.eval_judge, reference,
                             args.learning_rate_decay)
        print(f"interval: {INTERVAL}")
        try:
            run_loop(config, loop_args)
        except LoopStopped as e:
            print(f"stopped: {e}")
            return 130
        print(f"rounds in {config.output_dir}/round-*/ (chat: python -m kto_lite chat --adapter "
              f"{round_dir(config, args.rounds)})")
        return 0

    return cli.run(body)
