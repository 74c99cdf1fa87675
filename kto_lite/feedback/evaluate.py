"""Sampled accuracy of the base and of each adapter, with a 95% interval.

Every model answers every prompt n times; accuracy is the share of judged samples the judge accepts.
Seeding: sample j of prompt i uses the same random numbers for every model (sampling.row_seed), so
the same adapter always gets the same number, the base's samples are identical across invocations,
and the models are compared on common random numbers (less noise in their differences).

The interval: the samples of one prompt are not independent (an easy prompt is answered right n
times), so a plain binomial interval over n * prompts samples would be too narrow. We use the Wilson
score interval at an effective sample size n_eff = p(1-p) / Var(p), where Var(p) is the between-prompt
(cluster) variance of the accuracy, i.e. the sample count divided by Kish's design effect (Korn and
Graubard, 1998). Wilson rather than the normal interval because it stays inside [0, 1] and behaves
near 0 and 1; a design effect rather than a cluster bootstrap because it needs no random resampling
(the same numbers always give the same interval) and is exact to state. n_eff is capped at the number
of samples, so the interval is never narrower than if the samples were independent.
"""


from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

from tqdm.auto import tqdm

from kto_lite.feedback.judges import Judge, apply_judge
from kto_lite.feedback.sample import (
    SampleArgs,
)
from kto_lite.feedback.sampling import Loaded, Prompts, generate_samples

CONFIDENCE = 0.95
INTERVAL = "Wilson score interval at the design-effect sample size (prompts as clusters), 95%"


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


def wilson_interval(successes: float, n: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for a proportion successes / n (n may be an effective, non-integer size)."""
    if n <= 0:
        raise ValueError("the interval needs at least one sample")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def clustered_interval(per_prompt: list[tuple[int, int]], confidence: float = CONFIDENCE
                       ) -> tuple[float, float, float]:
    """(low, high, n_eff) from (correct, judged) per prompt; see the module docstring."""
    per_prompt = [(y, m) for y, m in per_prompt if m > 0]
    total = sum(m for _, m in per_prompt)
    p = sum(y for y, _ in per_prompt) / total
    n_eff = float(total)
    clusters = len(per_prompt)
    if clusters > 1 and 0 < p < 1:
        # ratio-estimator variance of p over clusters: P/(P-1) * sum (y_i - p m_i)^2 / (sum m_i)^2
        variance = clusters / (clusters - 1) * sum((y - p * m) ** 2 for y, m in per_prompt) / total**2
        if variance > 0:
            n_eff = min(n_eff, p * (1 - p) / variance)
    low, high = wilson_interval(p * n_eff, n_eff, confidence)
    return low, high, n_eff


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
