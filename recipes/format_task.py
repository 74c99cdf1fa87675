"""The format task: the real task's sums, asked to be answered in a format the base model rarely uses.

    prompt      "What is 3 + 5? Reply with only a JSON object with the keys "answer" and "explanation"."
    judge       desirable when the whole answer is that JSON object (alone, or alone in a Markdown code block):
                valid JSON, a dict with exactly those keys

What is judged is the format alone, not the sum: the desirable behaviour is a style the base model rarely
shows (the KTO paper's question of rare desirable data, and the kind of thing users teach with thumbs: "answer
like this"). The share of SmolLM2-135M-Instruct's samples each candidate format's judge accepts (4-bit, the
real task's sampling: temperature 0.7, top_p 0.9; 30 training prompts x 4 samples, `--probe 30`):

    json            0.042  (0.017 before a Markdown code block around the object was accepted)
    json_answer     0.000
    one_line_done   0.442
    tag             0.000

`benchmarks/methods.py` uses FORMAT = json: rare (at most 10% of the samples) but not absent, so that the base
model's own judged samples hold a few desirable examples to learn from.

The prompts are recipes/real_task.py's (same phrasings, same split by fact: held-out prompts ask sums no
training prompt asks), with the format instruction appended.

    python recipes/format_task.py runs/format/train.jsonl --n 150 --split train
    python recipes/format_task.py --probe 30        # the base model's share of each candidate format
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_task  # noqa: E402

MAX_NEW_TOKENS = 48  # the JSON object with a one-sentence explanation is ~25-35 tokens
SAMPLING = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": MAX_NEW_TOKENS}  # as the real task
_TAG = re.compile(r"<answer>\s*-?\d+\s*</answer>")
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)  # a Markdown code block around the whole answer


def _json_with(keys: set[str]):
    def check(completion: str) -> bool:
        text = completion.strip()
        fenced = _FENCE.match(text)
        try:
            value = json.loads(fenced.group(1) if fenced else text)
        except json.JSONDecodeError:
            return False
        return isinstance(value, dict) and set(value) == keys

    return check


def _one_line_done(completion: str) -> bool:
    text = completion.strip()
    return bool(text) and "\n" not in text and text.rstrip(".!").endswith("DONE")


def _tagged(completion: str) -> bool:
    text = completion.strip()
    return "\n" not in text and _TAG.search(text) is not None


# name -> (instruction appended to the question, the check of an answer)
FORMATS = {
    "json": ('Reply with only a JSON object with the keys "answer" and "explanation".',
             _json_with({"answer", "explanation"})),
    "json_answer": ('Reply with only a JSON object with the key "answer".', _json_with({"answer"})),
    "one_line_done": ("Answer in one line and end it with the word DONE.", _one_line_done),
    "tag": ("Answer in one line and put the number between <answer> and </answer>.", _tagged),
}
FORMAT = "json"  # what benchmarks/methods.py trains for
JUDGE = f"python:{Path(__file__).resolve()}:judge"


def judge(prompt, completion: str, row: dict) -> bool:
    """True when the answer is in the row's format (the `format` column; FORMAT when there is none)."""
    return FORMATS[row.get("format", FORMAT)][1](completion)


def prompt_rows(n: int, *, seed: int = 0, split: str = "train", fmt: str = FORMAT) -> list[dict]:
    instruction = FORMATS[fmt][0]
    return [{"prompt": f"{r['prompt']} {instruction}", "answer": r["answer"], "format": fmt}
            for r in real_task.prompt_rows(n, seed=seed, split=split)]


def write_prompts(path: str | Path, n: int, *, seed: int = 0, split: str = "train", fmt: str = FORMAT) -> Path:
    """A prompt file for `python -m kto_lite sample/evaluate/loop --judge python:recipes/format_task.py:judge`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(n, seed=seed, split=split, fmt=fmt)))
    return path


def probe(n_prompts: int, n: int = 4, model: str | None = None, formats: tuple[str, ...] = tuple(FORMATS),
          show: int = 3) -> dict[str, float]:
    """The share of the base model's samples that each candidate format's judge accepts (train-split prompts)."""
    root = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(root), str(root / "tests")]  # kto_lite, and tests/real_model.py for SmolLM2
    from kto_lite.generation import generate_samples, load_models, model_spec

    if model is None:
        from real_model import smollm2_gguf

        model = str(smollm2_gguf())
    loaded = load_models(model_spec(model))
    shares = {}
    for name in formats:
        check = FORMATS[name][1]
        rows = prompt_rows(n_prompts, seed=3, split="train", fmt=name)
        answers = [s.text for _, samples in generate_samples(loaded.model, loaded.tokenizer, [r["prompt"] for r in rows],
                                                             n=n, seed=0, **SAMPLING) for s in samples]
        shares[name] = sum(map(check, answers)) / len(answers)
        print(f"{name}: {shares[name]:.3f} of {len(answers)} samples", flush=True)
        for answer in answers[:show]:
            print(f"    {answer!r}", flush=True)
    return shares


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write a format-task prompt file (prompt, answer, format columns).")
    parser.add_argument("out", nargs="?", help="the .jsonl file to write")
    parser.add_argument("--n", type=int, default=150, help="number of prompts")
    parser.add_argument("--split", choices=("train", "eval"), default="train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=tuple(FORMATS), default=FORMAT)
    parser.add_argument("--probe", type=int, metavar="PROMPTS", help="measure the base model's share of each format")
    parser.add_argument("--formats", nargs="+", choices=tuple(FORMATS), default=list(FORMATS), help="with --probe")
    args = parser.parse_args()
    if args.probe:
        probe(args.probe, formats=tuple(args.formats))
    elif args.out:
        print(f"wrote {write_prompts(args.out, args.n, seed=args.seed, split=args.split, fmt=args.format)}")
    else:
        parser.error("give the file to write, or --probe N")
