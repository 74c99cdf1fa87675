"""Whether max_length and max_prompt_length leave anything worth training (the rule is in docs/data.md).

A KTO label judges a whole completion; trained on a stub of it, the label no longer describes what the
model sees. The rule: a run is refused, before the model loads, when most examples (half or more) would
keep less than half of their completion tokens after truncation. The refusal names the smallest
max_length at which most examples (more than half) keep their whole completion, computed from the
tokenized data with max_prompt_length following max_length as usual (half of it) unless it was set to
something else.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from kto_lite.data.examples import Example
from kto_lite.data.report import DataReport
from kto_lite.data.tokenize import tokenize
from kto_lite.errors import ConfigError

TRAINABLE_SHARE = 0.5  # an example keeping less than this share of its completion tokens is not worth training


def check_lengths(examples: list[Example], tokenizer: Any, report: DataReport, *, max_length: int | None,
                  max_prompt_length: int | None, use_chat_template: bool | None = None) -> None:
    """Raise ConfigError when most examples would keep less than half of their completion (the module's rule).

    `report` is the one `tokenize` just filled for these examples and limits: when most completions were
    not cut at all, nothing is tokenized again.
    """
    problem = length_problem(examples, tokenizer, report, max_length=max_length,
                             max_prompt_length=max_prompt_length, use_chat_template=use_chat_template)
    if problem:
        raise ConfigError(problem)


def length_problem(examples: list[Example], tokenizer: Any, report: DataReport, *, max_length: int | None,
                   max_prompt_length: int | None, use_chat_template: bool | None = None) -> str | None:
    """The refusal's message, or None when more than half of the examples keep at least half of their completion."""
    n = len(examples)
    cut = report.truncated_completions + report.dropped_no_completion
    if max_length is None or n == 0 or n - cut > n / 2:  # most completions are whole: nothing to compute
        return None
    full = tokenize(examples, tokenizer, max_length=None, max_prompt_length=None,
                    use_chat_template=use_chat_template)  # (prompt, completion) lengths before truncation
    lengths = [(len(e.prompt_ids), len(e.completion_ids)) for e in full]
    scales = max_prompt_length == max(1, max_length // 2)  # derived from max_length (TrainConfig.resolved)

    def prompt_cap(length: int) -> int | None:
        return max(1, length // 2) if scales else max_prompt_length

    lost = sum(not _keeps(p, c, max_length, prompt_cap(max_length), TRAINABLE_SHARE) for p, c in lengths)
    if lost < len(lengths) / 2:
        return None
    needed = sorted(_shortest_length(p, c, prompt_cap) for p, c in lengths)
    fits = needed[len(needed) // 2]  # more than half of the examples need at most this to keep their completion
    totals = [p + c for p, c in lengths]

    def limits(length: int) -> str:
        return f"max_length {length}" + (f" (max_prompt_length {prompt_cap(length)})" if prompt_cap(length) else "")

    return (f"{limits(max_length)} leaves too little to train: {lost} of {len(lengths)} examples would keep less "
            f"than half of their completion tokens. The smallest setting at which most examples keep their whole "
            f"completion: {limits(fits)}. The examples' whole length (prompt + completion): median "
            f"{statistics.median(totals):g} tokens, longest {max(totals)}. Rule: docs/data.md, Truncation.")


def _keeps(prompt: int, completion: int, max_length: int, prompt_cap: int | None, share: float) -> bool:
    """Whether `share` of the completion survives truncation as tokenize does it: the prompt to prompt_cap,
    then the completion to what is left of max_length."""
    kept_prompt = min(prompt, prompt_cap) if prompt_cap is not None else prompt
    return min(completion, max(0, max_length - kept_prompt)) >= math.ceil(share * completion)


def _shortest_length(prompt: int, completion: int, prompt_cap) -> int:
    """The smallest max_length at which this example keeps its whole completion (bisection: what is kept
    never shrinks as max_length grows, and prompt + completion keeps all of it)."""
    lo, hi = 1, max(prompt + completion, (prompt_cap(1) or 0) + 1)  # max_length must exceed max_prompt_length
    while lo < hi:
        mid = (lo + hi) // 2
        cap = prompt_cap(mid)
        if (cap is None or cap < mid) and _keeps(prompt, completion, mid, cap, 1.0):
            hi = mid
        else:
            lo = mid + 1
    return lo
