"""KTO from binary feedback, end to end, on the built-in demo model (CPU, no download).

    python recipes/demo.py            # the full recipe (README has its numbers and time)
    python recipes/demo.py --quick    # a reduced version, a few minutes on a laptop CPU

What a real user does, in four steps:
1. sample answers from the model for training questions;
2. label each answer good or bad with a judge: binary feedback only, no preference pairs;
3. train KTO with kto_lite's default settings (the exceptions are listed in `recipe_config`);
4. sample answers for held-out questions before and after, judge them, compare.
The last line printed is `accuracy before <x> after <y>` (fractions of held-out questions).
`--reverse-labels` flips every label: a trainer that follows the loss must then make things worse.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402

from kto_lite.config import TrainConfig  # noqa: E402
from kto_lite.demo import DEMO_MODEL_DIR, task  # noqa: E402
from kto_lite.model import load_base, load_tokenizer  # noqa: E402
from kto_lite.train import train  # noqa: E402

FULL = dict(train_prompts=1500, samples_per_prompt=4, eval_prompts=800, num_epochs=2)
QUICK = dict(train_prompts=400, samples_per_prompt=4, eval_prompts=400, num_epochs=2)


def recipe_config(data: Path, output_dir: Path, num_epochs: int, seed: int) -> TrainConfig:
    """kto_lite's defaults, except where this tiny model needs otherwise (each change says why)."""
    return TrainConfig(
        model=str(DEMO_MODEL_DIR),
        data=str(data),
        output_dir=str(output_dir),
        num_epochs=num_epochs,
        # A right answer already has log-prob ~ -0.6: its reward can rise by at most ~0.6 nats, while
        # wrong answers can be pushed down without limit. At beta 0.1 the loss is nearly linear in
        # the rewards and that unbounded side wins (probability leaks to malformed answers); beta 0.5
        # saturates the undesirable side sooner.
        beta=0.5,
        # A 1M-parameter model with rank-16 adapters moves far less per step than a 7B one: the
        # default 1e-5 would need hundreds of epochs.
        learning_rate=3e-4,
        # On a CPU, bitsandbytes' 4-bit kernels and gradient checkpointing halve the speed and save
        # nothing that matters for a 4 MB model (the 4-bit path is tested elsewhere).
        load_in_4bit=False,
        gradient_checkpointing=False,
        # The answers are ~10 tokens: short sequences, so a larger per-step batch gives a steadier
        # z0 estimate at no memory cost (the paper's advice: effective batch 16-128).
        batch_size=8,
        gradient_accumulation_steps=2,
        max_length=64,
        max_prompt_length=32,
        desirable_weight="auto",  # the sampled feedback is not balanced; eq. 8 of the paper
        undesirable_weight="auto",
        save_steps=0,
        seed=seed,
    )


def sample_feedback(model, tokenizer, n_prompts: int, per_prompt: int, seed: int, reverse: bool) -> list[dict]:
    prompts = task.make_prompts(n_prompts, seed=seed, split="train")
    samples = task.sample_completions(model, tokenizer, prompts, n_per_prompt=per_prompt, seed=seed)
    rows = []
    for prompt, completions in zip(prompts, samples):
        for completion in completions:
            label = task.judge(prompt, completion)  # the only signal: good or bad
            rows.append({"prompt": prompt, "completion": completion, "label": label != reverse})
    return rows


def main(argv: list[str] | None = None) -> tuple[float, float]:
    """Runs the recipe; returns held-out accuracy (before, after)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes: a few minutes on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reverse-labels", action="store_true", help="flip every label (a sanity check)")
    parser.add_argument("--output-dir", default="runs/demo", help="a fresh folder for data and adapter")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()):
        parser.error(f"{out} is not empty; choose another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    tokenizer = load_tokenizer(str(DEMO_MODEL_DIR))
    base = load_base(str(DEMO_MODEL_DIR), load_in_4bit=False)  # as training will load it
    eval_prompts = task.make_prompts(sizes["eval_prompts"], seed=args.seed + 1, split="eval")
    before = task.accuracy(base, tokenizer, eval_prompts, seed=args.seed)
    print(f"held-out accuracy before training: {before:.3f}")

    rows = sample_feedback(base, tokenizer, sizes["train_prompts"], sizes["samples_per_prompt"], args.seed,
                           args.reverse_labels)
    del base
    data = out / "feedback.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    n_good = sum(r["label"] for r in rows)
    print(f"sampled {len(rows)} answers: {n_good} labelled desirable, {len(rows) - n_good} undesirable")

    adapter = train(recipe_config(data, out / "adapter", sizes["num_epochs"], args.seed))

    tuned = PeftModel.from_pretrained(load_base(str(DEMO_MODEL_DIR), load_in_4bit=False), str(adapter)).eval()
    after = task.accuracy(tuned, tokenizer, eval_prompts, seed=args.seed)
    print(f"took {time.perf_counter() - started:.0f} s on {os.cpu_count()} CPU cores"
          if not torch.cuda.is_available() else f"took {time.perf_counter() - started:.0f} s")
    print(f"accuracy before {before:.3f} after {after:.3f}")
    return before, after


if __name__ == "__main__":
    main()
