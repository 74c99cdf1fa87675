"""`python -m kto_lite sample`: generate answers to prompts, optionally judge them into KTO rows.

    python -m kto_lite sample --model M [--adapter DIR] --prompts FILE --n 4 --out samples.jsonl
                              [--temperature 0.7] [--top_p 0.9] [--max_new_tokens 256] [--seed 0]
                              [--batch_size 32] [--judge SPEC [--reference_column C] [--judge_threshold T]]

Output, one JSON line per sample, in prompt order:
    {"prompt", "completion", "prompt_index", "sample_index", "truncated", <reference column>}
and with --judge also "label" and "judge": the file is then KTO training data (format 1) as it stands.
Samples the judge could not label go to <out stem>.failed.jsonl with the reason ("judge_error").

Resumable: the samples of each prompt are appended as soon as they are done. An interrupted run
keeps them; the same command continues after the last complete prompt, and gives the same file as an
uninterrupted run (kto_lite/generation.py: every sample is seeded on its own). <out stem>.meta.json records the
arguments that decide the samples; a rerun with different ones is refused, never overwritten.
"""

from __future__ import annotations

from pathlib import Path

from kto_lite.commands import cli
from kto_lite.config import TrainConfig
from kto_lite.errors import UsageError
from kto_lite.feedback.sample import (
    SampleArgs,
    build_judge,
    format_summary,
    resume_point,
    sample_meta,
    sample_to_file,
)
from kto_lite.generation import LOAD_OPTIONS, ModelSpec, load_models, model_spec, read_prompts
from kto_lite.judges import REFERENCE_COLUMNS


def add_sampling_flags(parser: cli.Parser, *, n_default: int = 4, seed: bool = True) -> None:
    """The flags that decide the samples, shared by sample, evaluate and loop."""
    defaults = SampleArgs()
    parser.add_flag("n", type=int, default=n_default, help=f"samples per prompt (default {n_default})")
    parser.add_flag("temperature", type=float, default=defaults.temperature,
                    help=f"sampling temperature; 0: greedy (default {defaults.temperature})")
    parser.add_flag("top_p", type=float, default=defaults.top_p,
                    help=f"nucleus sampling: keep the smallest set of tokens with this much probability; "
                         f"1: off (default {defaults.top_p})")
    parser.add_flag("max_new_tokens", type=int, default=defaults.max_new_tokens,
                    help=f"longest answer, in tokens (default {defaults.max_new_tokens})")
    if not seed:  # `loop` takes the config's seed
        return
    parser.add_flag("seed", type=int, default=0, help="sample j of prompt i is drawn with a generator seeded "
                    "from (seed, i, j): the same for any batch size and when resumed (default 0)")


def add_judge_flags(parser: cli.Parser, *, required: bool) -> None:
    parser.add_flag("judge", required=required, metavar="SPEC",
                    help="exact | contains | regex:PATTERN | number (against the reference answer column) | "
                         "python:MODULE:FUNCTION | python:FILE.py:FUNCTION (docs/loop.md)")
    parser.add_flag("reference_column", metavar="NAME",
                    help=f"the column holding the reference answer (default: the first of "
                         f"{', '.join(REFERENCE_COLUMNS)})")
    parser.add_flag("judge_threshold", type=float, metavar="T",
                    help="for a python judge that returns a score: desirable when score >= T")


def add_model_flags(parser: cli.Parser) -> None:
    parser.add_flag("model", help="base model: hub id, folder or .gguf file (default: the adapter's base, else "
                                  "the built-in demo model)")
    parser.add_flag("batch_size", type=int, default=32,
                    help="sequences generated together; changes speed and memory, not the samples (default 32)")
    parser.add_config_fields(list(LOAD_OPTIONS))  # as `train` spells them; unset: as the adapter's run


def spec_from_args(args, adapters: list[str]) -> ModelSpec:
    """What --model, --adapter and the loading flags name (unset flags: as the adapter's run was trained)."""
    options = {name: getattr(args, name) for name in LOAD_OPTIONS if hasattr(args, name)}
    try:
        spec = model_spec(args.model, adapters, **options)
        TrainConfig.from_dict({name: spec.options[name] for name in LOAD_OPTIONS})  # type-checks the values
    except ValueError as e:  # adapters of different bases, or a ConfigError
        raise UsageError(str(e)) from e
    return spec


def sample_args(args) -> SampleArgs:
    for name in ("n", "max_new_tokens", "batch_size"):
        if getattr(args, name, 1) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UsageError(f"--temperature must be >= 0 and --top_p in (0, 1], got {args.temperature}, "
                             f"{args.top_p}")
    return SampleArgs(n=args.n, temperature=args.temperature, top_p=args.top_p,
                      max_new_tokens=args.max_new_tokens, seed=args.seed, judge=args.judge,
                      reference_column=args.reference_column, judge_threshold=args.judge_threshold)


def main(argv: list[str]) -> int:
    parser = cli.Parser("sample", __doc__.split("\n\n")[0].strip("`"))
    add_model_flags(parser)
    parser.add_flag("adapter", help="a training run's output_dir (default: sample the base)")
    parser.add_flag("prompts", required=True, help="prompt file: a 'prompt' column (text or messages) or "
                                                   "'messages', in any data format kto_lite reads")
    parser.add_flag("out", required=True, help="the samples file (.jsonl), appended to and resumable")
    add_sampling_flags(parser)
    add_judge_flags(parser, required=False)
    args = parser.parse_args(argv)

    def body() -> int:
        settings = sample_args(args)
        prompts = read_prompts(args.prompts)
        build_judge(settings, prompts)  # a bad spec or a missing reference column fails before the model loads
        spec = spec_from_args(args, [args.adapter] if args.adapter else [])
        adapter = spec.adapters[0] if spec.adapters else None
        resume_point(Path(args.out), sample_meta(spec, adapter, prompts, settings), settings.n)  # refuse early
        loaded = load_models(spec)
        summary = sample_to_file(loaded, adapter, prompts, args.out, settings, batch_size=args.batch_size)
        print(format_summary(summary, judged=settings.judge is not None))
        return 0

    return cli.run(body)
