"""What came after KTO, measured: KTO (the defaults) against its variants, one and two rounds of the loop.

    OMP_NUM_THREADS=1 python benchmarks/methods.py [--tasks real format] [--variants kto humanline bco]
                      [--seeds 0 1 2] [--rounds 2] [--workdir runs/methods] [--results benchmarks/results/methods.json]

For each task, variant and seed, `python -m kto_lite loop` (kto_lite.feedback.loop.run_loop) runs --rounds rounds
on SmolLM2-135M-Instruct: sample --n answers to each training prompt with the current policy, judge them,
train, evaluate on the held-out prompts. Within a seed every variant starts from the same feedback (round 1
samples the base with the same seed) and trains with the same budget (the library's defaults: one epoch, the
same steps, learning rate halved in round 2); the variants differ only in their loss:

    kto        KTO as kto_lite trains it by default (paper eq. 7-8)
    humanline  humanline: true (Liu, Muennighoff, Ethayarajh 2025; docs/methods.md), its default bounds and sync
    bco        binary classifier optimization (Jung et al. 2024): -log sigmoid(+-(beta r - delta)), delta the
               running mean of the rewards (TRL's BCO without its optional density-ratio weights). A candidate:
               it is not a loss_type of kto_lite; here it stands in for kto_loss in the recipe (`BCOLoss`), which
               still computes KTO's KL rows (unused by BCO: the same steps, a little more work)

Tasks, both judged by a program: `real` (recipes/real_task.py: single-digit sums, judged `number`) and `format`
(recipes/format_task.py: the same sums asked as a JSON object, judged on the format, which the base model gets
right in at most 10% of its samples). Held-out judged success per round, with the loop's 95% interval, the mean
over seeds, and each variant's difference from KTO paired by held-out prompt (the same prompts and draws within
a seed): per seed, and pooled, each prompt's difference averaged over the seeds, with a 95% interval over prompts.
A variant is a candidate for a default only where it beats KTO on both tasks (docs/methods.md).

Resumable: the loop keeps finished rounds under <workdir>/<task>/<variant>/seed-<s>; rerun to continue. Variants
and seeds may also run in separate invocations on the same workdir (on separate cores); then
`--finished_only` trains nothing and compares every run there that finished all its rounds (read back, no model
loaded), each variant with KTO on the seeds both ran.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from judged_bench import (
    default_model,
    environment,
    load_task,
    paired_by_prompt,
    save,
    signed,
    success_per_prompt,
)

import kto_lite.training.recipe as recipe_module
from kto_lite.config import TrainConfig
from kto_lite.feedback.loop import LoopArgs, run_loop
from kto_lite.feedback.sample import SampleArgs
from kto_lite.runs import read_jsonl
from kto_lite.training.loss import KTOLossOutput

VARIANTS = {"kto": {}, "humanline": {"humanline": True}, "bco": {}}


class BCOLoss:
    """BCO's loss with kto_loss's signature (Jung et al. 2024, "Binary Classifier Optimization for Large Language
    Model Alignment"; TRL's BCOTrainer without UDM): with rewards beta * (log pi - log pi_ref),

        desirable: -log sigmoid(reward - delta),   undesirable: -log sigmoid(-(reward - delta))

    delta the running mean of every reward seen in training so far, this micro-batch's included (TRL's
    RunningMoments). No-grad calls (evaluation) leave delta alone. One process; `reset` at each new run."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.mean, self.count = 0.0, 0

    def __call__(self, policy_logps, reference_logps, labels, *, beta: float = 0.1, **_) -> KTOLossOutput:
        rewards = beta * (policy_logps - reference_logps).float()  # (B,)
        if torch.is_grad_enabled():
            n = rewards.numel()
            self.mean += (float(rewards.detach().sum()) - n * self.mean) / (self.count + n)
            self.count += n
        delta = rewards.new_tensor(self.mean)
        losses = torch.where(labels.bool(), -F.logsigmoid(rewards - delta), -F.logsigmoid(-(rewards - delta)))
        return KTOLossOutput(losses.mean(), losses, rewards.detach(), delta)


@contextmanager
def variant_loss(name: str):
    """The recipe's loss for this variant: BCO stands in for kto_loss (reset for every training run)."""
    if name != "bco":
        yield
        return
    bco, real_loss, real_setup = BCOLoss(), recipe_module.kto_loss, recipe_module.Recipe.setup

    def setup(self):
        bco.reset()
        return real_setup(self)

    recipe_module.kto_loss, recipe_module.Recipe.setup = bco, setup
    try:
        yield
    finally:
        recipe_module.kto_loss, recipe_module.Recipe.setup = real_loss, real_setup


def per_prompt(folder: Path) -> dict[int, float]:
    """A round's held-out success per prompt (the loop's eval_samples.jsonl): prompt index -> share right."""
    return success_per_prompt(read_jsonl(folder / "eval_samples.jsonl"))


def paired(runs: dict[int, dict], kto: dict[int, dict]) -> dict | None:
    """A variant's round against KTO's ({seed: round row}) on the seeds both ran (judged_bench.paired_by_prompt)."""
    return paired_by_prompt({seed: per_prompt(Path(x["adapter"])) for seed, x in runs.items()},
                            {seed: per_prompt(Path(x["adapter"])) for seed, x in kto.items()})


def summarize(rows: dict, rounds: int) -> dict:
    """Per task, variant and round: the mean over seeds, each seed's, and against KTO the paired difference."""
    out = {}
    for (task, variant), seeds in rows.items():
        for r in range(rounds + 1):
            runs = {seed: s[r] for seed, s in seeds.items()}
            entry = {"success": statistics.fmean(x["accuracy"] for x in runs.values()),
                     "seeds": {seed: (round(x["accuracy"], 4), round(x["low"], 4), round(x["high"], 4))
                               for seed, x in runs.items()}}
            kto = {seed: s[r] for seed, s in rows.get((task, "kto"), {}).items()}
            if variant != "kto" and r > 0 and (vs := paired(runs, kto)):
                entry["vs_kto"] = vs
            out[f"{task}/{variant}/round-{r}"] = entry
    return out


def table(summary: dict, tasks: list[str], variants: list[str], rounds: int) -> str:
    lines = ["| task | variant | seeds | " + " | ".join(f"round {r}: held-out judged success, mean (each seed); vs KTO, "
                                                       "paired" for r in range(1, rounds + 1)) + " |",
             "|---|---|---|" + "---|" * rounds]
    for task in tasks:
        ran = [v for v in variants if f"{task}/{v}/round-0" in summary]
        if not ran:
            continue
        base = summary[f"{task}/{'kto' if 'kto' in ran else ran[0]}/round-0"]
        each = " / ".join(f"{x[0]:.2f}" for _, x in sorted(base["seeds"].items()))
        lines.append(f"| {task} | base | {len(base['seeds'])} | {base['success']:.3f} ({each})" + " | -" * (rounds - 1)
                     + " |")
        for variant in ran:
            cells = []
            for r in range(1, rounds + 1):
                e = summary[f"{task}/{variant}/round-{r}"]
                each = " / ".join(f"{x[0]:.2f}" for _, x in sorted(e["seeds"].items()))
                cells.append(f"{e['success']:.3f} ({each})" + (f"; {signed(e['vs_kto'])}" if "vs_kto" in e else ""))
            seeds = len(summary[f"{task}/{variant}/round-1"]["seeds"])
            lines.append(f"| {task} | {variant} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def finished(folder: Path, rounds: int) -> bool:
    """Whether a loop under `folder` has finished every round (its rounds can be read back without a model)."""
    return (folder / "round-0.json").is_file() and all((folder / f"round-{r}" / "round.json").is_file()
                                                       for r in range(1, rounds + 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=("real", "format", "demo"), default=["real", "format"])
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", help="the base model (default: SmolLM2-135M-Instruct; the demo task: its model)")
    parser.add_argument("--train_prompts", type=int, default=150)
    parser.add_argument("--n", type=int, default=4, help="samples per training prompt and round")
    parser.add_argument("--eval_prompts", type=int, default=100)
    parser.add_argument("--eval_n", type=int, default=2, help="judged answers per held-out prompt")
    parser.add_argument("--load_in_4bit", type=lambda v: v.lower() == "true", default=True)
    parser.add_argument("--max_steps", type=int, help="cap every round's steps (smoke tests)")
    parser.add_argument("--workdir", default="runs/methods")
    parser.add_argument("--results", default="benchmarks/results/methods.json")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--finished_only", action="store_true",
                        help="train nothing: compare the runs under --workdir that finished every round (a variant "
                             "may have fewer seeds; it is compared with KTO on the seeds both ran)")
    args = parser.parse_args(argv)

    rows: dict = {}
    for task_name in args.tasks:
        task, work = load_task(task_name), Path(args.workdir) / task_name
        model = args.model or default_model(task_name)
        train_file = task.write_prompts(work / "train_prompts.jsonl", args.train_prompts, seed=0, split="train")
        eval_file = task.write_prompts(work / "heldout_prompts.jsonl", args.eval_prompts, seed=1, split="eval")
        sampling = SampleArgs(n=args.n, judge=task.JUDGE, **task.SAMPLING)
        for variant in args.variants:
            for seed in args.seeds:
                if args.finished_only and not finished(work / variant / f"seed-{seed}", args.rounds):
                    continue
                config = TrainConfig(model=model, output_dir=str(work / variant / f"seed-{seed}"), seed=seed,
                                     save_steps=0, eval_steps=10**6, load_in_4bit=args.load_in_4bit,
                                     max_steps=args.max_steps, **VARIANTS[variant])
                loop_args = LoopArgs(args.rounds, str(train_file), str(eval_file), sampling, eval_n=args.eval_n)
                with variant_loss(variant):
                    table_rows = run_loop(config, loop_args, show_progress=not args.quiet,
                                          echo=(lambda line: None) if args.quiet else print)
                rows.setdefault((task_name, variant), {})[seed] = table_rows
    summary = summarize(rows, args.rounds)
    text = table(summary, args.tasks, args.variants, args.rounds)
    print(text)
    save(args.results, {"environment": environment([sys.executable, *sys.argv]), "args": vars(args),
                        "rounds": {f"{t}/{v}": seeds for (t, v), seeds in rows.items()}, "summary": summary,
                        "table": text})
    return 0


if __name__ == "__main__":
    sys.exit(main())
