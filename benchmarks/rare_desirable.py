"""Rare desirable examples: KTO on the same feedback with its desirable rows cut to 50%, 25% and 10%.

    OMP_NUM_THREADS=1 python benchmarks/rare_desirable.py [--fractions 1 0.5 0.25 0.1] [--seeds 0 1 2]
                      [--task real] [--workdir runs/rare_desirable] [--results benchmarks/results/rare_desirable.json]

The KTO paper (Ethayarajh et al. 2024) reports that KTO still matches DPO when up to 90% of the desirable
examples are thrown away. Measured here on the real-model task (recipes/real_task.py, SmolLM2-135M-Instruct):
1. the base model answers --train_prompts training prompts --n times, once, judged by the task's judge
   (`number`): feedback.jsonl, and its desirable share;
2. for every fraction f and seed s, a run trains on all the undesirable rows and a random f of the desirable
   ones (drawn with seed s; f = 1: all of them), everything else equal and at the library's defaults: 4-bit,
   LoRA r 16, desirable_weight / undesirable_weight 'auto' (the paper's eq. 8 reweighs the rarer side), one
   epoch (fewer rows are fewer steps, as for a user who has less data), training seed s;
3. every run judges its sampled answers to --eval_prompts held-out prompts during training (kto_lite's judged
   evaluation: step 0, which is the base, and the end); a fraction's number is the mean over seeds of the last
   judged success, and its difference from f = 1 is paired by prompt within each seed (the same draws), each
   prompt's difference averaged over the seeds, with a 95% interval over prompts (judged_bench.paired_by_prompt).

4. each --try NAME:FIELD=VALUE[,FIELD=VALUE] trains the smallest fraction again with those config fields changed
   (e.g. `no_rebalancing:desirable_weight=1,undesirable_weight=1`, `epochs_3:num_epochs=3`), the same data, seeds
   (or --try_seeds, a subset) and held-out draws, compared prompt by prompt with the defaults at that fraction on
   those seeds: what to change where the defaults do not hold.

Resumable: finished runs are kept under <workdir>/runs; rerun the same command to continue. Prints a Markdown
table and writes the results with the command, date and load average (--results).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import yaml
from judged_bench import (
    default_model,
    environment,
    interval,
    judged_fields,
    load_task,
    pooled,
    sample_feedback,
    save,
    signed,
    train_judged,
)

from kto_lite.config import TrainConfig


def subset(feedback: Path, out: Path, fraction: float, seed: int) -> dict:
    """All undesirable rows and a random `fraction` of the desirable ones (at least one), in file order."""
    rows = [json.loads(line) for line in feedback.read_text().splitlines() if line.strip()]
    desirable = [i for i, r in enumerate(rows) if r["label"]]
    keep = set(random.Random(seed).sample(desirable, max(1, round(fraction * len(desirable)))))
    kept = [r for i, r in enumerate(rows) if not r["label"] or i in keep]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    return {"desirable": len(keep), "undesirable": len(rows) - len(desirable)}


def table(base: float, feedback: dict, rows: list[dict]) -> str:
    lines = [f"Base model: judged success {base:.3f}; its feedback: {feedback['samples']} samples, "
             f"{feedback['desirable']} desirable ({feedback['desirable_share']:.3f}).", "",
             "| desirable kept | desirable rows | undesirable rows | steps | held-out judged success (mean of seeds) "
             "| per seed [95% interval] | vs all desirable, paired [95% CI] |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        seeds = "; ".join(interval(s["success"], s["low"], s["high"]) for s in r["runs"])
        vs = signed(r["pooled"]["vs"]) if r["fraction"] != 1 else "-"
        lines.append(f"| {r['fraction']:.0%} | {r['counts']['desirable']} | {r['counts']['undesirable']} | "
                     f"{r['runs'][0]['steps']} | {r['pooled']['success']:.3f} | {seeds} | {vs} |")
    return "\n".join(lines)


def tries_table(fraction: float, default: list[dict], tries: list[dict]) -> str:
    """The tries at the smallest fraction against `default`, that fraction's runs on the tries' seeds."""
    lines = [f"| {fraction:.0%} desirable, changed | steps | held-out judged success (mean of seeds) "
             "| per seed [95% interval] | vs the defaults, paired [95% CI] |", "|---|---|---|---|---|",
             f"| nothing (the defaults) | {default[0]['steps']} | {pooled(default)['success']:.3f} | "
             + "; ".join(interval(s["success"], s["low"], s["high"]) for s in default) + " | - |"]
    for t in tries:
        changes = ", ".join(f"`{k}: {v}`" for k, v in t["changes"].items())
        lines.append(f"| {changes} | {t['runs'][0]['steps']} | {t['pooled']['success']:.3f} | "
                     + "; ".join(interval(s["success"], s["low"], s["high"]) for s in t["runs"])
                     + f" | {signed(t['pooled']['vs'])} |")
    return "\n".join(lines)


def parse_try(text: str) -> tuple[str, dict]:
    """NAME:FIELD=VALUE[,FIELD=VALUE] -> (NAME, {FIELD: value}); values read as YAML (1 -> 1, true -> True)."""
    name, sep, fields = text.partition(":")
    pairs = [f.partition("=") for f in fields.split(",") if f]
    if not sep or not name or not pairs or any(not eq or not k for k, eq, _ in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:FIELD=VALUE[,FIELD=VALUE]")
    return name, {k: yaml.safe_load(v) for k, _, v in pairs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("real", "format", "demo"), default="real")
    parser.add_argument("--model", help="the base model (default: SmolLM2-135M-Instruct; the demo task: its model)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train_prompts", type=int, default=150)
    parser.add_argument("--n", type=int, default=4, help="feedback samples per training prompt")
    parser.add_argument("--eval_prompts", type=int, default=100)
    parser.add_argument("--eval_n", type=int, default=2, help="judged answers per held-out prompt")
    parser.add_argument("--feedback_seed", type=int, default=1)
    parser.add_argument("--load_in_4bit", type=lambda v: v.lower() == "true", default=True)
    parser.add_argument("--max_steps", type=int, help="cap every run's steps (smoke tests)")
    parser.add_argument("--workdir", default="runs/rare_desirable")
    parser.add_argument("--results", default="benchmarks/results/rare_desirable.json")
    parser.add_argument("--try", dest="tries", type=parse_try, action="append", default=[],
                        help="NAME:FIELD=VALUE[,FIELD=VALUE]: the smallest fraction again with these fields changed")
    parser.add_argument("--try_seeds", type=int, nargs="+",
                        help="the seeds of the --try runs (default: --seeds), compared with the defaults on the same seeds")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not set(args.try_seeds or []) <= set(args.seeds):
        parser.error("--try_seeds must be among --seeds: a try is compared with the defaults on the same seed")
    if 1.0 not in args.fractions:
        parser.error("--fractions must include 1 (all desirable rows): the others are compared with it")

    task, work = load_task(args.task), Path(args.workdir)
    model = args.model or default_model(args.task)
    train_file = task.write_prompts(work / "train_prompts.jsonl", args.train_prompts, seed=0, split="train")
    eval_file = task.write_prompts(work / "heldout_prompts.jsonl", args.eval_prompts, seed=1, split="eval")
    feedback = sample_feedback(work, task, model, train_file, n=args.n, seed=args.feedback_seed,
                               load_in_4bit=args.load_in_4bit, quiet=args.quiet)

    def runs_at(fraction: float, seeds: list[int], name: str = "", **changes) -> tuple[list[dict], dict]:
        runs, counts = [], {}
        for seed in seeds:
            data = work / "data" / f"f{fraction:g}_s{seed}.jsonl"
            counts = subset(work / "feedback.jsonl", data, fraction, seed)
            folder = work / "runs" / (f"f{fraction:g}_s{seed}" + (f"_{name}" if name else ""))
            config = TrainConfig(model=model, data=str(data), output_dir=str(folder), seed=seed, save_steps=0,
                                 eval_steps=10**6, load_in_4bit=args.load_in_4bit, max_steps=args.max_steps,
                                 **judged_fields(task, eval_file, args.eval_n) | changes)
            runs.append(train_judged(config, quiet=args.quiet))
        return runs, counts

    rows, full = [], None
    for fraction in sorted(args.fractions, reverse=True):
        runs, counts = runs_at(fraction, args.seeds)
        full = runs if fraction == 1.0 else full
        rows.append({"fraction": fraction, "counts": counts, "runs": runs,
                     "pooled": pooled(runs, None if fraction == 1.0 else full)})
    tries = []
    for name, changes in args.tries:  # at the smallest fraction, against its defaults
        runs, _ = runs_at(rows[-1]["fraction"], args.try_seeds or args.seeds, name, **changes)
        tries.append({"name": name, "changes": changes, "runs": runs, "pooled": pooled(runs, rows[-1]["runs"])})
    base = sum(r["start"] for r in full) / len(full)  # step 0 of every run is the base (its seed's draws)
    text = table(base, feedback, rows)
    if tries:
        seeds = {r["seed"] for r in tries[0]["runs"]}
        text += "\n\n" + tries_table(rows[-1]["fraction"], [r for r in rows[-1]["runs"] if r["seed"] in seeds], tries)
    print(text)
    save(args.results, {"environment": environment([sys.executable, *sys.argv]), "args": vars(args),
                        "feedback": feedback, "base": base, "rows": rows, "tries": tries, "table": text})
    return 0


if __name__ == "__main__":
    sys.exit(main())
