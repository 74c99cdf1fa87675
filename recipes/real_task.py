"""The real-model task: single-digit addition asked in several ways, judged by the number in the answer.

    prompt      "Add 3 and 5."          (one of PHRASINGS, filled with two digits 0..9)
    answer      8                        (the reference column; the judge is kto_lite's `number`)

Why this task for SmolLM2-135M-Instruct (measured, docs/defaults.md): the model knows these sums
(greedy decoding gets about half right) but, sampled at the usual chat settings (temperature 0.7,
top_p 0.9), it often rambles into a wrong or missing number; about 0.2-0.35 of its samples are right.
So its own samples, judged, hold both labels in good numbers, and KTO can teach it to answer the way
its right answers do. Harder variants were probed and rejected: two-digit sums, subtraction and
"reply with only the number" get 0.0-0.16 of samples right (too few desirable examples to learn from).

Judge: `--judge number`, desirable when the answer's last number equals the sum ("3 + 5 = 8." and
"The answer is 8" are right; "8 + 1 = 9" for 3 + 5 is wrong; so is an answer cut off before its number).
`judge` below is the same rule as a python judge (`--judge python:recipes/real_task.py:judge`).

Splits are by fact, not by prompt: every phrasing of one sum belongs to the same split, and a + b
goes with b + a, so held-out prompts ask sums the training prompts never ask in any form. The split
is fixed by a hash of the unordered pair (no seed).

    python recipes/real_task.py runs/real/train.jsonl --n 150 --split train
    python recipes/real_task.py runs/real/heldout.jsonl --n 200 --split eval --seed 1

A second kind of held-out prompts asks the *practised* facts in words the training prompts do not
use: `--practised train.jsonl` takes prompts of the train split whose sum the training file asks
(in another phrasing or order) but which it does not contain itself. Held-out facts measure whether
what is learnt carries to sums never practised; held-out phrasings, whether the practised sums are
answered right however they are asked (benchmarks/results/real_rounds.md).

    python recipes/real_task.py runs/real/phrasings.jsonl --n 200 --practised runs/real/train.jsonl --seed 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from pathlib import Path

MAX_OPERAND = 9
# 2 of 5 unordered pairs held out: ~40 of the 100 ordered facts, so the held-out pool is large enough
# for 200 prompts, and ~60 facts (about 360 prompts) are left to train on.
EVAL_FRACTION = (2, 5)
PHRASINGS = (
    "What is {a} + {b}?",
    "Add {a} and {b}.",
    "What is the sum of {a} and {b}?",
    "Calculate {a} + {b}.",
    "{a} + {b} = ?",
    "What is {a} plus {b}?",
)
MAX_NEW_TOKENS = 32  # a direct answer ("3 + 5 = 8.") is ~8 tokens; a ramble is cut and usually wrong
# How the task is sampled: kto_lite's chat defaults. (At temperature 1.0 this model's samples are
# mostly incoherent: 0.1-0.2 right, and little for KTO to learn from.)
SAMPLING = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": MAX_NEW_TOKENS}
JUDGE = "number"

_NUMBERS = re.compile(r"-?\d+")


def fact(a: int, b: int) -> tuple[int, int]:
    """The sum a + b as a fact: b + a is the same one."""
    return min(a, b), max(a, b)


def split_of(a: int, b: int) -> str:
    """"train" or "eval" for the sum a + b (and b + a), from a hash: no seed decides it."""
    low, high = fact(a, b)
    digest = hashlib.sha256(f"{low}+{high}".encode()).digest()
    share, out_of = EVAL_FRACTION
    return "eval" if int.from_bytes(digest[:4], "big") % out_of < share else "train"


def _pool(split: str) -> list[dict]:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    return [{"prompt": phrasing.format(a=a, b=b), "answer": a + b, "a": a, "b": b}
            for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1) if split_of(a, b) == split
            for phrasing in PHRASINGS]


def all_rows(split: str = "train") -> list[dict]:
    """Every prompt of one split with its answer, in a fixed order."""
    return _pool(split)


def prompt_rows(n: int, *, seed: int = 0, split: str = "train") -> list[dict]:
    """`n` distinct prompt rows of one split, chosen by `seed`: {"prompt", "answer", "a", "b"}."""
    pool = _pool(split)
    if not 0 <= n <= len(pool):
        raise ValueError(f"the {split} split has {len(pool)} prompts; cannot choose {n}")
    return random.Random(seed).sample(pool, n)


def practised_rows(n: int, training_prompts: list[dict], *, seed: int = 0) -> list[dict]:
    """`n` prompts of the train split that ask a sum of `training_prompts` but are not among them."""
    used = {r["prompt"] for r in training_prompts}
    facts = {fact(r["a"], r["b"]) for r in training_prompts}
    pool = [r for r in _pool("train") if r["prompt"] not in used and fact(r["a"], r["b"]) in facts]
    if not 0 <= n <= len(pool):
        raise ValueError(f"{len(pool)} unused prompts ask the practised sums; cannot choose {n}")
    return random.Random(seed).sample(pool, n)


def judge(prompt, completion: str, row: dict) -> bool:
    """True when the completion's last integer is the sum (kto_lite's `number` judge, for these rows)."""
    numbers = _NUMBERS.findall(completion.replace(",", ""))
    return bool(numbers) and int(numbers[-1]) == int(row["answer"])


def write_prompts(path: str | Path, n: int, *, seed: int = 0, split: str = "train",
                  practised: str | Path | None = None) -> Path:
    """A prompt file for `python -m kto_lite sample/evaluate/loop --judge number`; with `practised` (a training
    prompt file), held-out phrasings of its sums instead of a split's prompts."""
    path = Path(path)
    if practised is not None:
        training = [json.loads(line) for line in Path(practised).read_text().splitlines() if line.strip()]
        rows = practised_rows(n, training, seed=seed)
    else:
        rows = prompt_rows(n, seed=seed, split=split)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write a real-task prompt file (prompt + answer columns).")
    parser.add_argument("out", help="the .jsonl file to write")
    parser.add_argument("--n", type=int, default=150, help="number of prompts")
    parser.add_argument("--split", choices=("train", "eval"), default="train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--practised", metavar="TRAIN.jsonl",
                        help="held-out phrasings of the sums this training prompt file asks (instead of --split)")
    args = parser.parse_args()
    print(f"wrote {write_prompts(args.out, args.n, seed=args.seed, split=args.split, practised=args.practised)}")
