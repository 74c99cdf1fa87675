"""The demo task: small arithmetic questions answered in one sentence, judged by a program.

    prompt      "What is 17 + 25?"
    answer      "17 + 25 = 42."        (the reference; the only form the judge accepts)

Operands are 0..MAX_OPERAND; subtraction never goes below zero. Every question belongs to exactly
one split, fixed by a hash of its text, so train and eval prompts never overlap and the split does
not depend on any seed. The demo model (recipes/build_demo_model.py, shipped in kto_lite/demo/) was
trained on answers that are right only about half the time, so sampling it and judging the samples
gives binary feedback that KTO can learn from (recipes/demo.py, `python -m kto_lite loop`).

With kto_lite's commands: `python recipes/demo_task.py prompts.jsonl --n 400 --split train` writes a
prompt file with an `answer` column, and `--judge exact` is this task's judge. `judge` and
`reversed_judge` below are the same as python judges (`--judge python:recipes/demo_task.py:judge`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from pathlib import Path

MAX_OPERAND = 50
EVAL_FRACTION_DENOMINATOR = 5  # 1 question in 5 is held out for evaluation
WRONG_ANSWER_OFFSETS = (-10, -2, -1, 1, 2, 10)  # how far a wrong training answer is off
MAX_NEW_TOKENS = 16  # the longest right answer, "50 + 50 = 100." plus the end token, is 13 tokens
# How the demo is sampled: the model's own distribution (no nucleus cut), as it was measured.
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": MAX_NEW_TOKENS}

_PROMPT_RE = re.compile(r"What is (\d+) ([+-]) (\d+)\?")


def _split_of(prompt: str) -> str:
    digest = hashlib.sha256(prompt.encode()).digest()
    return "eval" if int.from_bytes(digest[:4], "big") % EVAL_FRACTION_DENOMINATOR == 0 else "train"


def _all_prompts() -> list[str]:
    prompts = []
    for a in range(MAX_OPERAND + 1):
        for b in range(MAX_OPERAND + 1):
            prompts.append(f"What is {a} + {b}?")
            if a >= b:
                prompts.append(f"What is {a} - {b}?")
    return prompts


_SPLITS: dict[str, list[str]] = {"train": [], "eval": []}
for _p in _all_prompts():
    _SPLITS[_split_of(_p)].append(_p)


def all_prompts(split: str = "train") -> list[str]:
    """Every question of one split ("train" or "eval"), in a fixed order."""
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    return list(_SPLITS[split])


def make_prompts(n: int, *, seed: int, split: str = "train") -> list[str]:
    """`n` distinct questions from one split, chosen by `seed` (same seed, same list)."""
    pool = all_prompts(split)
    if not 0 <= n <= len(pool):
        raise ValueError(f"the {split} split has {len(pool)} questions; cannot choose {n}")
    return random.Random(seed).sample(pool, n)


def parse_prompt(prompt: str) -> tuple[int, str, int]:
    """("What is 17 + 25?") -> (17, "+", 25). ValueError for anything else."""
    match = _PROMPT_RE.fullmatch(prompt.strip())
    if match is None:
        raise ValueError(f"not a demo question: {prompt!r}")
    return int(match.group(1)), match.group(2), int(match.group(3))


def _result(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def format_answer(prompt: str, result: int) -> str:
    """The sentence that states `result` as the answer to `prompt`: "17 + 25 = 42."."""
    a, op, b = parse_prompt(prompt)
    return f"{a} {op} {b} = {result}."


def reference_answer(prompt: str) -> str:
    """The right completion for `prompt`, in the only form `judge` accepts."""
    return format_answer(prompt, _result(*parse_prompt(prompt)))


def wrong_answer(prompt: str, rng: random.Random) -> str:
    """A plausible wrong completion: the right form, the result off by 1, 2 or 10 (never negative)."""
    right = _result(*parse_prompt(prompt))
    deltas = [d for d in WRONG_ANSWER_OFFSETS if right + d >= 0]
    return format_answer(prompt, right + rng.choice(deltas))


def judge(prompt: str, completion: str) -> bool:
    """True only if `completion` is exactly the reference sentence (surrounding whitespace aside)."""
    return completion.strip() == reference_answer(prompt)


def reversed_judge(prompt: str, completion: str) -> bool:
    """The judge with every label flipped: training on it must make the model worse (a sign check)."""
    return not judge(prompt, completion)


def accuracy(model, tokenizer, prompts: list[str], *, seed: int = 0, temperature: float = 1.0) -> float:
    """Share of `prompts` whose one sample (kto_lite's seeded sampler, SAMPLING) the judge accepts."""
    from kto_lite.generation import generate_samples

    settings = {**SAMPLING, "temperature": temperature}
    samples = generate_samples(model, tokenizer, prompts, n=1, seed=seed, batch_size=64, **settings)
    return sum(judge(prompts[k], s[0].text) for k, s in samples) / max(len(prompts), 1)


def prompt_rows(n: int, *, seed: int, split: str) -> list[dict]:
    """Prompt-file rows: {"prompt": question, "answer": reference sentence}."""
    return [{"prompt": p, "answer": reference_answer(p)} for p in make_prompts(n, seed=seed, split=split)]


def write_prompts(path: str | Path, n: int, *, seed: int = 0, split: str = "train") -> Path:
    """A prompt file for `python -m kto_lite sample/evaluate/loop` (judge: exact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(n, seed=seed, split=split)))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write a demo-task prompt file (prompt + answer columns).")
    parser.add_argument("out", help="the .jsonl file to write")
    parser.add_argument("--n", type=int, default=400, help="number of questions")
    parser.add_argument("--split", choices=("train", "eval"), default="train")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {write_prompts(args.out, args.n, seed=args.seed, split=args.split)}")
