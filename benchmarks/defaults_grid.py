"""The defaults grid: learning rate x beta for LoRA KTO on a real model, judged by held-out accuracy.

    OMP_NUM_THREADS=1 python benchmarks/defaults_grid.py [--lrs 5e-5 1e-4 2e-4 5e-4] [--betas 0.1 0.3]
                                                         [--workdir runs/defaults_grid] [--num_epochs 1]

What it does (docs/defaults.md has the results and how they were made):
1. prompt files from recipes/real_task.py (single-digit addition; train and held-out sums disjoint);
2. the base model (SmolLM2-135M-Instruct from its GGUF, 4-bit NF4 as training loads it) samples
   --n answers to each training prompt ONCE, judged by `number`: the feedback every cell trains on;
3. the base answers each held-out prompt --eval_n times (evaluation seed, common random numbers):
   the base accuracy, and, judged, a held-out KTO file whose reward margin each run reports;
4. every cell trains one LoRA KTO run on that feedback, with every other setting at the library
   default (4-bit, LoRA r 16, batch 4 x accumulation 4, training seed 42), then answers the held-out
   prompts with the same random numbers as the base.

Per cell: held-out accuracy with its 95% interval (evaluate's clustered Wilson interval), the paired
difference from the base (per-prompt differences on common random numbers, a normal interval over
prompts), the reward margin on the held-out KTO file at the end of training, and the training time.
Resumable: finished cells are kept in <workdir>/cells/*.json; rerun the same command to continue.
Prints a markdown table and writes the raw results as JSON (--results).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from judged_bench import paired_by_prompt, success_per_prompt  # noqa: E402

from kto_lite.config import TrainConfig  # noqa: E402
from kto_lite.feedback.evaluate import evaluate_one  # noqa: E402
from kto_lite.feedback.sample import SampleArgs, sample_to_file  # noqa: E402
from kto_lite.generation import load_models, model_spec, read_prompts  # noqa: E402
from kto_lite.runs import read_metrics  # noqa: E402


def load_task():
    spec = importlib.util.spec_from_file_location("real_task", ROOT / "recipes" / "real_task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def paired_difference(rows_a: list[dict], rows_b: list[dict]) -> dict:
    """Mean per-prompt accuracy difference a - b with a 95% normal interval over prompts.

    Both lists hold judged samples {"prompt_index", "label"} of the same prompts drawn with the same
    random numbers, so the per-prompt difference removes the prompt-to-prompt variance (one seed of
    judged_bench.paired_by_prompt)."""
    return paired_by_prompt({0: success_per_prompt(rows_a)}, {0: success_per_prompt(rows_b)})


def tail_mean(rows: list[dict], key: str, share: float = 0.1) -> float | None:
    """Mean of `key` over the last `share` of logged steps (as train's summary reports it)."""
    values = [r[key] for r in rows if key in r]
    if not values:
        return None
    tail = values[-max(1, int(len(values) * share)):]
    return sum(tail) / len(tail)


def prepare(args, task, model: str) -> dict:
    """Prompt files, the base's feedback and its held-out answers (once; reused on a rerun)."""
    work = Path(args.workdir)
    train_file = task.write_prompts(work / "train_prompts.jsonl", args.train_prompts, seed=0, split="train")
    eval_file = task.write_prompts(work / "heldout_prompts.jsonl", args.eval_prompts, seed=1, split="eval")
    train_prompts, eval_prompts = read_prompts(train_file), read_prompts(eval_file)
    base_file = work / "base.json"
    if base_file.is_file():
        return json.loads(base_file.read_text()) | {"eval_prompts": eval_prompts}
    loaded = load_models(model_spec(model))
    sampling = SampleArgs(n=args.n, seed=args.feedback_seed, judge=task.JUDGE, **task.SAMPLING)
    start = time.perf_counter()
    summary = sample_to_file(loaded, None, train_prompts, work / "feedback.jsonl", sampling)
    sample_seconds = time.perf_counter() - start
    evaluation = SampleArgs(n=args.eval_n, seed=args.eval_seed, judge=task.JUDGE, **task.SAMPLING)
    from kto_lite.judges import make_judge

    start = time.perf_counter()
    result, rows = evaluate_one(loaded, None, eval_prompts, make_judge(task.JUDGE), evaluation)
    eval_seconds = time.perf_counter() - start
    _write_jsonl(work / "base_eval_samples.jsonl", rows)
    # the base's judged held-out answers as KTO rows: each run's held-out reward margin is measured on them
    _write_jsonl(work / "heldout_feedback.jsonl", [
        {"prompt": eval_prompts.rows[r["prompt_index"]].prompt, "completion": r["completion"], "label": r["label"]}
        for r in rows if "label" in r])
    base = {"accuracy": asdict(result), "feedback": {k: summary[k] for k in ("samples", "desirable",
                                                                              "desirable_share")},
            "sample_seconds": sample_seconds, "eval_seconds": eval_seconds}
    base_file.write_text(json.dumps(base, indent=1) + "\n")
    return base | {"eval_prompts": eval_prompts}


def run_cell(args, task, model: str, base: dict, lr: float, beta: float, weights: str) -> dict:
    from kto_lite.judges import make_judge
    from kto_lite.training.recipe import train

    work = Path(args.workdir)
    name = f"lr{lr:g}_beta{beta:g}_w{weights}" + (f"_e{args.num_epochs:g}" if args.num_epochs != 1 else "")
    cell_file = work / "cells" / f"{name}.json"
    if cell_file.is_file():
        return json.loads(cell_file.read_text())
    out = work / "runs" / name
    weight = {"1.0": {"desirable_weight": 1.0, "undesirable_weight": 1.0},
              "auto": {"desirable_weight": "auto", "undesirable_weight": "auto"}}[weights]
    eval_data = {"eval_data": str(work / "heldout_feedback.jsonl")} if args.heldout_margin else {}
    config = TrainConfig(model=model, data=str(work / "feedback.jsonl"), output_dir=str(out),
                         learning_rate=lr, beta=beta, num_epochs=args.num_epochs, overwrite_output_dir=True,
                         save_steps=0, **weight, **eval_data)
    start = time.perf_counter()
    train(config, show_progress=not args.quiet)
    train_seconds = time.perf_counter() - start
    metrics = read_metrics(out)
    loaded = load_models(model_spec(model, [str(out)]))
    evaluation = SampleArgs(n=args.eval_n, seed=args.eval_seed, judge=task.JUDGE, **task.SAMPLING)
    start = time.perf_counter()
    result, rows = evaluate_one(loaded, str(out), base["eval_prompts"], make_judge(task.JUDGE), evaluation,
                                show_progress=not args.quiet)
    eval_seconds = time.perf_counter() - start
    _write_jsonl(out / "eval_samples.jsonl", rows)
    base_rows = [json.loads(line) for line in (work / "base_eval_samples.jsonl").read_text().splitlines()]
    eval_lines = [r for r in metrics if "eval_rewards/margins" in r]
    cell = {"learning_rate": lr, "beta": beta, "weights": weights, "num_epochs": args.num_epochs, "accuracy": asdict(result),
            "vs_base": paired_difference(rows, base_rows),
            "heldout_margin": eval_lines[-1]["eval_rewards/margins"] if eval_lines else None,
            "train_margin": tail_mean(metrics, "rewards/margins"),
            "train_loss": tail_mean(metrics, "loss"), "steps": max((r.get("step", 0) for r in metrics), default=0),
            "train_seconds": train_seconds, "eval_seconds": eval_seconds}
    cell_file.parent.mkdir(parents=True, exist_ok=True)
    cell_file.write_text(json.dumps(cell, indent=1) + "\n")
    return cell


def table(base: dict, cells: list[dict]) -> str:
    b = base["accuracy"]
    lines = ["| weights | learning rate | beta | epochs | held-out accuracy [95% CI] | vs base [95% CI] | held-out reward margin "
             "| train reward margin | train time |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| - | base | - | - | {b['accuracy']:.3f} [{b['low']:.3f}, {b['high']:.3f}] | - | - | - | - |"]
    for c in cells:
        a, d = c["accuracy"], c["vs_base"]
        margin = "-" if c["heldout_margin"] is None else f"{c['heldout_margin']:+.3f}"
        train_margin = "-" if c["train_margin"] is None else f"{c['train_margin']:+.3f}"
        lines.append(f"| {c['weights']} | {c['learning_rate']:g} | {c['beta']:g} | {c['num_epochs']:g} | {a['accuracy']:.3f} [{a['low']:.3f}, "
                     f"{a['high']:.3f}] | {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] | {margin} | "
                     f"{train_margin} | {c['train_seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="the base model (default: SmolLM2-135M-Instruct's GGUF, tests/real_model.py)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-5, 1e-4, 2e-4, 5e-4])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--weights", nargs="+", choices=("auto", "1.0"), default=["auto", "1.0"],
                        help="desirable/undesirable weights: 'auto' (the paper's eq. 8 from the label counts; the "
                             "library default) or 1.0 and 1.0 (the paper's default for balanced data)")
    parser.add_argument("--num_epochs", type=float, default=1)
    parser.add_argument("--heldout_margin", action="store_true",
                        help="also train with the base's judged held-out answers as eval_data (their reward margin "
                             "at the end; costs ~3 min a cell here)")
    parser.add_argument("--train_prompts", type=int, default=150)
    parser.add_argument("--n", type=int, default=4, help="feedback samples per training prompt")
    parser.add_argument("--eval_prompts", type=int, default=200)
    parser.add_argument("--eval_n", type=int, default=2, help="samples per held-out prompt")
    parser.add_argument("--feedback_seed", type=int, default=1)
    parser.add_argument("--eval_seed", type=int, default=0)
    parser.add_argument("--workdir", default="runs/defaults_grid")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "defaults_grid.json"))
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    task = load_task()
    if args.model is None:
        from real_model import smollm2_gguf

        args.model = str(smollm2_gguf())
    started = time.perf_counter()
    base = prepare(args, task, args.model)
    b = base["accuracy"]
    print(f"base: accuracy {b['accuracy']:.3f} [{b['low']:.3f}, {b['high']:.3f}]; feedback "
          f"{base['feedback']['samples']} samples, desirable share {base['feedback']['desirable_share']:.3f}",
          flush=True)
    cells = []
    for weights in args.weights:
        for beta in args.betas:
            for lr in args.lrs:
                cells.append(run_cell(args, task, args.model, base, lr, beta, weights))
                c = cells[-1]
                print(f"weights {weights} lr {lr:g} beta {beta:g}: accuracy {c['accuracy']['accuracy']:.3f} "
                      f"({c['vs_base']['diff']:+.3f} vs base), train {c['train_seconds']:.0f} s", flush=True)
    # the table: every finished cell of this workdir (earlier invocations' too), weights, beta, lr order
    cells = [json.loads(f.read_text()) for f in sorted((Path(args.workdir) / "cells").glob("*.json"))]
    cells.sort(key=lambda c: (c["weights"] != "auto", c["beta"], c["num_epochs"], c["learning_rate"]))
    print(table(base, cells))
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in base.items() if k != "eval_prompts"}
    results.write_text(json.dumps({
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "model": args.model,
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
        "settings": {k: v for k, v in vars(args).items() if k not in ("results", "quiet")},
        "task": {"recipe": "recipes/real_task.py", "judge": task.JUDGE, "sampling": task.SAMPLING},
        "this_invocation_seconds": time.perf_counter() - started, "base": base, "cells": cells,
    }, indent=1) + "\n")
    print(f"raw results: {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
