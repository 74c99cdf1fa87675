"""Build the built-in demo model from scratch: tokenizer, tiny Llama, supervised training, samples.

    HF_HUB_OFFLINE=1 python recipes/build_demo_model.py            # writes kto_lite/demo/model/ and data/

What it makes (docs/demo_model.md has the measured numbers):
- a byte-level BPE tokenizer (digits always single tokens) with a chat template whose assistant turn
  ends in <|end|>, the eos token;
- a 4-layer LlamaForCausalLM trained with next-token loss on the arithmetic task of
  recipes/demo_task.py, where each training answer is right only with probability --p-right and
  otherwise off by 1, 2 or 10. Sampled at temperature 1 it is right about that often, on held-out
  questions as on training ones, while the right answer keeps most of the probability mass: the
  starting point KTO needs to show that binary feedback improves behaviour;
- the sample feedback files in kto_lite/demo/data/ (the model's own samples, labelled by the judge).

Deterministic: fixed seeds, one fixed thread count, torch.use_deterministic_algorithms. Runs on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "recipes"))

import demo_task as task  # noqa: E402

from kto_lite.demo import DEMO_DATA_DIR, DEMO_MODEL_DIR  # noqa: E402
from kto_lite.generation import generate_samples  # noqa: E402
from kto_lite.model import write_demo_checksums  # noqa: E402

BOS, EOS, PAD = "<|begin|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# One turn = <|role|>content<|end|>, no whitespace in between, so the rendered prompt (with the
# generation prompt) is an exact prefix of the rendered prompt + answer: completion tokens never
# depend on how the prompt was cut.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


# ---------------------------------------------------------------- tokenizer
def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes, no unknown token) trained on the task's sentences.

    Digits are split before BPE so every number is spelt digit by digit: the model then learns
    arithmetic on digits instead of memorising one token per number.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    corpus = []
    for split in ("train", "eval"):
        for prompt in task.all_prompts(split):
            corpus += [prompt, task.reference_answer(prompt)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=128,
    )


# ---------------------------------------------------------------- model
def build_model(tokenizer, args) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,  # a multiple of 64 so bitsandbytes' 4-bit blocks fit exactly
        intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden_size // 32,
        num_key_value_heads=args.hidden_size // 32,
        max_position_embeddings=128,
        tie_word_embeddings=True,  # a third fewer weights at this size
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


# ---------------------------------------------------------------- training data
class ExampleMaker:
    """Draws chat-formatted training examples with the answer right with probability p_right."""

    def __init__(self, tokenizer, p_right: float, seed: int):
        self.tokenizer = tokenizer
        self.p_right = p_right
        self.rng = random.Random(seed)
        self.prompts = task.all_prompts("train")
        self._prompt_ids = {}
        self._completion_ids = {}

    def _ids(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        if prompt not in self._prompt_ids:
            self._prompt_ids[prompt] = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=False
            )
        if completion not in self._completion_ids:
            self._completion_ids[completion] = self.tokenizer.encode(
                completion + self.tokenizer.eos_token, add_special_tokens=False
            )
        return self._prompt_ids[prompt], self._completion_ids[completion]

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, labels), each (size, T); labels are -100 outside the answer."""
        rows = []
        for _ in range(size):
            prompt = self.rng.choice(self.prompts)
            right = self.rng.random() < self.p_right
            completion = task.reference_answer(prompt) if right else task.wrong_answer(prompt, self.rng)
            rows.append(self._ids(prompt, completion))
        width = max(len(p) + len(c) for p, c in rows)
        pad = self.tokenizer.pad_token_id
        input_ids, mask, labels = [], [], []
        for p, c in rows:
            n_pad = width - len(p) - len(c)
            input_ids.append(p + c + [pad] * n_pad)
            mask.append([1] * (len(p) + len(c)) + [0] * n_pad)
            labels.append([-100] * len(p) + c + [-100] * n_pad)  # loss on the answer and <|end|> only
        return torch.tensor(input_ids), torch.tensor(mask), torch.tensor(labels)


def check_prefix_property(tokenizer) -> None:
    """The tokens of prompt + generation prompt must be a prefix of those of the whole chat."""
    prompt = task.make_prompts(1, seed=0)[0]
    messages = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": task.reference_answer(prompt)}], return_dict=False
    )
    assert full[: len(head)] == head and full[-1] == tokenizer.eos_token_id, (head, full)


# ---------------------------------------------------------------- train
def lr_at(step: int, args) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, tokenizer, args) -> None:
    maker = ExampleMaker(tokenizer, args.p_right, args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    model.train()
    start, running = time.time(), None
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        input_ids, attention_mask, labels = maker.batch(args.batch_size)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            print(
                f"step {step + 1:5d}  loss {running:.4f}  lr {lr_at(step, args):.2e}  {time.time() - start:6.0f}s"
            )
    model.eval()


# ---------------------------------------------------------------- save and report
def save(model, tokenizer, out_dir: Path) -> float:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,  # plain temperature-1 sampling: what the demo measures
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=task.MAX_NEW_TOKENS,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    write_demo_checksums(out_dir)  # SHA256SUMS: what kto_lite checks before loading the demo model
    return (out_dir / "model.safetensors").stat().st_size / 1e6


def write_sample_files(out_dir: Path, model, tokenizer, *, n_prompts: int = 200, n_per_prompt: int = 2,
                       seed: int = 0) -> dict[str, Path]:
    """Sample the model on train prompts, label each sample with the judge, write three files.

    demo_kto.jsonl       {"prompt", "completion", "label"}        one row per sample
    demo_paired.jsonl    {"prompt", "chosen", "rejected"}          prompts with a right and a wrong sample
    demo_messages.jsonl  {"messages": [user, assistant], "label"}  the same rows as demo_kto
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = task.make_prompts(n_prompts, seed=seed, split="train")
    kto_rows, paired_rows, message_rows = [], [], []
    for k, samples in generate_samples(model, tokenizer, prompts, n=n_per_prompt, seed=seed, **task.SAMPLING):
        prompt, completions = prompts[k], [s.text for s in samples]
        labels = [task.judge(prompt, c) for c in completions]
        for completion, label in zip(completions, labels):
            kto_rows.append({"prompt": prompt, "completion": completion, "label": label})
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            message_rows.append({"messages": messages, "label": label})
        if any(labels) and not all(labels):
            chosen, rejected = completions[labels.index(True)], completions[labels.index(False)]
            paired_rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    paths = {name: out_dir / f"demo_{name}.jsonl" for name in ("kto", "paired", "messages")}
    for name, rows in (("kto", kto_rows), ("paired", paired_rows), ("messages", message_rows)):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEMO_MODEL_DIR, help="where the model and tokenizer go")
    ap.add_argument("--data-out", type=Path, default=DEMO_DATA_DIR, help="where the sample files go")
    ap.add_argument("--no-samples", action="store_true", help="do not (re)write the sample files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads; results can differ across counts")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=320)
    ap.add_argument("--p-right", type=float, default=0.5, help="chance a training answer is right")
    ap.add_argument("--eval-prompts", type=int, default=400, help="prompts per split for the final accuracy")
    ap.add_argument("--log-every", type=int, default=100)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    tokenizer = build_tokenizer(args.vocab_size)
    check_prefix_property(tokenizer)
    model = build_model(tokenizer, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}  parameters {n_params / 1e6:.2f}M")

    train(model, tokenizer, args)
    size_mb = save(model, tokenizer, args.out)
    train_s = time.time() - t0

    t1 = time.time()
    eval_prompts = task.make_prompts(args.eval_prompts, seed=args.seed, split="eval")
    held_out = task.accuracy(model, tokenizer, eval_prompts, seed=args.seed)
    seen = task.accuracy(
        model, tokenizer, task.make_prompts(args.eval_prompts, seed=args.seed), seed=args.seed
    )
    greedy = task.accuracy(model, tokenizer, eval_prompts, seed=args.seed, temperature=0)
    rate = 2 * args.eval_prompts / (time.time() - t1)
    if not args.no_samples:
        paths = write_sample_files(args.data_out, model, tokenizer, seed=args.seed)
        print("sample files: " + ", ".join(str(p) for p in paths.values()))

    print(f"wrote {args.out}  model.safetensors {size_mb:.1f} MB  build {train_s:.0f}s (training + save)")
    print(f"sampling ~{rate:.0f} prompts/s")
    print(
        f"accuracy at temperature 1: held-out {held_out:.3f}  train {seen:.3f}  (greedy held-out {greedy:.3f})"
    )


if __name__ == "__main__":
    main()
