"""Sampled accuracy of the base and of each adapter, with a 95% interval.

Every model answers every prompt n times; accuracy is the share of judged samples the judge accepts.
Seeding: sample j of prompt i uses the same random numbers for every model (sampling.row_seed), so
the same adapter always gets the same number, the base's samples are identical across invocations,
and the models are compared on common random numbers (less noise in their differences).

The interval (kto_lite/judges.py `clustered_interval`) treats the prompts as clusters.
"""


from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

from kto_lite.feedback.sample import (
    SampleArgs,
)
from kto_lite.generation import Loaded, Prompts, generate_samples
from kto_lite.judges import Judge, apply_judge, clustered_interval


@dataclass
class Accuracy:
    name: str  # "base" or the adapter folder
    adapter: str | None
    accuracy: float | None  # None when nothing could be judged
    low: float | None
    high: float | None
    correct: int
    judged: int  # samples the judge labeled
    judge_failures: int  # samples it could not label (left out of the accuracy)
    prompts: int
    effective_n: float | None


def evaluate_one(loaded: Loaded, adapter: str | None, prompts: Prompts, judge: Judge, args: SampleArgs, *,
                 batch_size: int = 32, show_progress: bool = True) -> tuple[Accuracy, list[dict]]:
    """Sample and judge every prompt with one model (adapter None: the base). Returns the result and
    the judged samples ({"prompt_index", "sample_index", "completion", "label"/"judge_error"})."""
    name = "base" if adapter is None else str(adapter)
    rows: list[dict] = []
    per_prompt: list[tuple[int, int]] = []
    bar = tqdm(total=len(prompts.rows) * args.n, desc=f"evaluating {name}", unit="sample",
               disable=not show_progress, leave=False)
    with loaded.use(adapter) as model, bar:
        samples = generate_samples(
            model, loaded.tokenizer, [r.prompt for r in prompts.rows], n=args.n, temperature=args.temperature,
            top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=batch_size,
            use_chat_template=loaded.use_chat_template, progress=bar)
        for i, completions in samples:
            right = judged = 0
            for j, sample in enumerate(completions):
                label, reason = apply_judge(judge, prompts.rows[i].prompt, sample.text, prompts.rows[i].row)
                row = {"prompt_index": i, "sample_index": j, "completion": sample.text}
                rows.append(row | ({"label": label} if label is not None else {"judge_error": reason}))
                if label is not None:
                    judged += 1
                    right += label
            per_prompt.append((right, judged))
    correct, judged = sum(y for y, _ in per_prompt), sum(m for _, m in per_prompt)
    low = high = n_eff = accuracy = None
    if judged:
        accuracy = correct / judged
        low, high, n_eff = clustered_interval(per_prompt)
    result = Accuracy(name, None if adapter is None else str(adapter), accuracy, low, high, correct, judged,
                      len(rows) - judged, len(prompts.rows), n_eff)
    return result, rows


def format_table(results: list[Accuracy]) -> str:
    width = max(len("model"), *(len(r.name) for r in results))
    lines = [f"{'model':<{width}}  accuracy  95% interval    judged"]
    for r in results:
        if r.accuracy is None:
            lines.append(f"{r.name:<{width}}  -         -               0 (the judge labeled nothing)")
            continue
        failed = f"  ({r.judge_failures} not judged)" if r.judge_failures else ""
        lines.append(f"{r.name:<{width}}  {r.accuracy:<8.3f}  [{r.low:.3f}, {r.high:.3f}]  {r.judged}{failed}")
    return "\n".join(lines)
