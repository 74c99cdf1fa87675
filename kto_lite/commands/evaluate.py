"""`python -m kto_lite evaluate`: sampled accuracy of the base and of each adapter, with a 95% interval.

    python -m kto_lite evaluate --model M --adapter RUN1 [--adapter RUN2 ...] --prompts HELDOUT.jsonl
                                --judge SPEC [--n 4] [--seed 0] [--json]

How the accuracy and its interval are computed: kto_lite/feedback/evaluate.py.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from kto_lite.commands import cli
from kto_lite.commands.sample import (
    add_judge_flags,
    add_model_flags,
    add_sampling_flags,
    sample_args,
    spec_from_args,
)
from kto_lite.feedback.evaluate import evaluate_one, format_table
from kto_lite.feedback.sample import build_judge
from kto_lite.generation import load_models, read_prompts
from kto_lite.judges import INTERVAL


def main(argv: list[str]) -> int:
    parser = cli.Parser("evaluate", __doc__.split("\n\n")[0].strip("`"))
    add_model_flags(parser)
    parser.add_flag("adapter", action="append", default=[], help="a training run's output_dir; repeat the flag "
                                                                 "for several (the base is always evaluated)")
    parser.add_flag("prompts", required=True, help="held-out prompts with their reference answers")
    add_sampling_flags(parser)
    add_judge_flags(parser, required=True)
    parser.add_flag("json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)

    def body() -> int:
        settings = sample_args(args)
        prompts = read_prompts(args.prompts)
        judge = build_judge(settings, prompts)
        loaded = load_models(spec_from_args(args, args.adapter))
        results = [evaluate_one(loaded, a, prompts, judge, settings, batch_size=args.batch_size,
                                show_progress=not args.json)[0] for a in [None, *loaded.adapters.values()]]
        if args.json:
            print(json.dumps({"prompts": prompts.path, "interval": INTERVAL, "model": loaded.spec.model_name,
                              "sampling": asdict(settings), "results": [asdict(r) for r in results]}, indent=1))
        else:
            print(f"{len(prompts.rows)} prompts x {settings.n} samples, judge {settings.judge}, seed {settings.seed}")
            print(format_table(results))
            print(f"interval: {INTERVAL} (docs/loop.md)")
        return 0

    return cli.run(body)
