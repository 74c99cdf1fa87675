"""The demo task: small arithmetic questions answered in one sentence, judged by a program.

    prompt      "What is 17 + 25?"
    completion  "17 + 25 = 42."        (the only form the judge accepts)

Operands are 0..MAX_OPERAND; subtraction never goes below zero. Every question belongs to exactly
one split, fixed by a hash of its text, so train and eval prompts never overlap and the split does
not depend on any seed. The demo model (recipes/build_demo_model.py) was trained on answers that
are right only about half the time, so sampling it and judging the samples gives binary feedback
that KTO can learn from (recipes/demo.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
from pathlib import Path

import torch

MAX_OPERAND = 50
EVAL_FRACTION_DENOMINATOR = 5  # 1 question in 5 is held out for evaluation
WRONG_ANSWER_OFFSETS = (-10, -2, -1, 1, 2, 10)  # how far a wrong training answer is off
MAX_NEW_TOKENS = 16  # the longest right answer, "50 + 50 = 100." plus the end token, is 13 tokens

_PROMPT_RE = re.compile(r"What is (\d+) ([+-]) (\d+)\?")


# ---------------------------------------------------------------- questions and answers
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


# ---------------------------------------------------------------- sampling from a model
def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _keep_4bit_weights_trainable(model):
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference while we sample.

    bitsandbytes 0.50's Linear4bit, on a CPU with AVX512-BF16, converts its weight to an
    inference-only layout on the first eval-mode forward without grad, for good; afterwards no
    gradient flows back through the layer (only a "gemv_4bit: an autograd kernel was not
    registered" warning), which silently breaks LoRA training of every layer below. Sampling
    before training, as the KTO demo does, would trigger it, so the repacking is switched off here.
    """
    layers = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for layer in layers:
            layer.support_avx512bf16_for_cpu = True


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: list[str],
    *,
    n_per_prompt: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = MAX_NEW_TOKENS,
    seed: int = 0,
    batch_size: int = 64,
) -> list[list[str]]:
    """Sample `n_per_prompt` completions for each prompt; result[i][j] is prompt i's j-th sample.

    Prompts go through the tokenizer's chat template as one user turn. Sampling is plain
    temperature sampling (no top-k/top-p), so accuracy measures the model's own distribution;
    temperature 0 means greedy. The same arguments give the same samples: the seed is applied
    inside `torch.random.fork_rng`, which also leaves the caller's random state untouched. Works
    for a transformers model or a peft.PeftModel; the model is put in eval mode while sampling.
    """
    if n_per_prompt < 1 or batch_size < 1:
        raise ValueError("n_per_prompt and batch_size must be at least 1")
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    encoded = tokenizer.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    rows = [ids for ids in encoded for _ in range(n_per_prompt)]  # prompt i's samples are adjacent
    pad_id = tokenizer.pad_token_id
    device = _device_of(model)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    if temperature == 0:
        sampling = {"do_sample": False}

    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        with (
            _keep_4bit_weights_trainable(model),
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        ):
            torch.manual_seed(seed)
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                width = max(len(ids) for ids in batch)
                # Left padding: every row's last prompt token sits in the same column, where generation starts.
                input_ids = torch.tensor(
                    [[pad_id] * (width - len(ids)) + ids for ids in batch], device=device
                )
                attention_mask = torch.tensor(
                    [[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device
                )
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id,
                    eos_token_id=tokenizer.eos_token_id,
                    **sampling,
                )
                texts += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return [texts[i * n_per_prompt : (i + 1) * n_per_prompt] for i in range(len(prompts))]


def accuracy(
    model,
    tokenizer,
    prompts: list[str],
    *,
    seed: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 64,
) -> float:
    """Fraction of prompts whose one sampled completion the judge accepts."""
    samples = sample_completions(
        model,
        tokenizer,
        prompts,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
    )
    return sum(judge(p, s[0]) for p, s in zip(prompts, samples)) / max(len(prompts), 1)


# ---------------------------------------------------------------- the shipped sample files
def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_sample_files(
    out_dir: str | Path,
    model,
    tokenizer,
    *,
    n_prompts: int = 200,
    n_per_prompt: int = 2,
    seed: int = 0,
    temperature: float = 1.0,
) -> dict[str, Path]:
    """Sample the model on train prompts, label each sample with the judge, write three files.

    demo_kto.jsonl       {"prompt", "completion", "label"}        one row per sample
    demo_paired.jsonl    {"prompt", "chosen", "rejected"}          prompts with a right and a wrong sample
    demo_messages.jsonl  {"messages": [user, assistant], "label"}  the same rows as demo_kto
    Returns {file stem without "demo_": path}, e.g. {"kto": .../demo_kto.jsonl, ...}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = make_prompts(n_prompts, seed=seed, split="train")
    samples = sample_completions(
        model, tokenizer, prompts, n_per_prompt=n_per_prompt, temperature=temperature, seed=seed
    )
    kto_rows, paired_rows, message_rows = [], [], []
    for prompt, completions in zip(prompts, samples):
        labels = [judge(prompt, c) for c in completions]
        for completion, label in zip(completions, labels):
            kto_rows.append({"prompt": prompt, "completion": completion, "label": label})
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            message_rows.append({"messages": messages, "label": label})
        if any(labels) and not all(labels):
            chosen = completions[labels.index(True)]
            rejected = completions[labels.index(False)]
            paired_rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    paths = {
        "kto": out_dir / "demo_kto.jsonl",
        "paired": out_dir / "demo_paired.jsonl",
        "messages": out_dir / "demo_messages.jsonl",
    }
    _write_jsonl(paths["kto"], kto_rows)
    _write_jsonl(paths["paired"], paired_rows)
    _write_jsonl(paths["messages"], message_rows)
    return paths
