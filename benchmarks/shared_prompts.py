"""When does scoring a prompt once for its example and KL completions pay? (share_prompts)

A training step scores each example (prompt + completion, with grad) and its KL row (the same prompt
+ another example's completion, no grad, for z0). Separate rows run the prompt twice; shared rows
(batching.collate_shared) run it once, but the KL completion then joins the backward pass. This
script times both ways of one micro-batch on the real SmolLM2-135M-Instruct (fp32, LoRA r16 on all
linear layers, no checkpointing, as the smollm2 preset of bench_vs_trl.py) for rows of the same total
length and different prompt shares, in one invocation, alternating the two layouts:

    python benchmarks/shared_prompts.py                      # ~3 min on 2 CPU cores
    python benchmarks/shared_prompts.py --load-in-4bit --gradient-checkpointing   # as kto_lite trains by default
    python benchmarks/shared_prompts.py --tokens 128 --batch 8 --repeat 5

Shared / separate < 1 means sharing is faster. The trainer's automatic rule (training/layout.py SHARE_PROMPT_RATIO)
shares in training when prompts hold more than 1.5 tokens per completion token, 2.4 with gradient
checkpointing: where this script's two layouts cross (docs/performance.md, section 5).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def step_seconds(model, layout: str, prompts, completions, kl_completions) -> float:
    """One micro-batch: log-probs of the examples with grad, of the KL rows for z0, and backward."""
    from kto_lite.training.batching import collate, collate_shared
    from kto_lite.training.logps import completion_logps

    started = time.perf_counter()
    if layout == "shared":
        logps = completion_logps(model, collate_shared(prompts, [completions, kl_completions]))
        policy, kl = logps[: len(prompts)], logps[len(prompts) :].detach()
    else:
        policy = completion_logps(model, collate(prompts, completions, 0, packed=True))
        with torch.no_grad():
            kl = completion_logps(model, collate(prompts, kl_completions, 0, packed=True))
    (policy - kl.mean()).sum().backward()  # a loss of both, as kto_loss is (z0 detached)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="prompt + completion tokens per row")
    parser.add_argument("--batch", type=int, default=8, help="rows per micro-batch")
    parser.add_argument("--repeat", type=int, default=3, help="timed steps per layout and share (fastest kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--load-in-4bit", action="store_true", help="the base in 4-bit NF4 (default: fp32)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute each layer in backward (the trainer's default)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from real_model import smollm2_dir

    from kto_lite.config import TrainConfig
    from kto_lite.model import add_lora, load_base
    from kto_lite.training.logps import supports_shared_prompts

    path = str(smollm2_dir())
    model = add_lora(load_base(path, load_in_4bit=args.load_in_4bit, precision="no"),
                     TrainConfig(model=path, lora_r=16, lora_alpha=32, lora_dropout=0.0, load_in_4bit=args.load_in_4bit,
                                 gradient_checkpointing=args.gradient_checkpointing).resolved())
    model.train()
    assert supports_shared_prompts(model), "SmolLM2 should take shared-prompt rows"
    vocab = model.get_base_model().config.vocab_size
    g = torch.Generator().manual_seed(0)

    def rows(n):
        return [torch.randint(0, vocab, (n,), generator=g).tolist() for _ in range(args.batch)]

    print(f"SmolLM2-135M-Instruct {'4-bit NF4' if args.load_in_4bit else 'fp32'}, LoRA r16, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, {args.batch} rows of {args.tokens} tokens, "
          f"{args.threads} thread(s), fastest of {args.repeat}\n")
    print("| prompt : completion tokens | prompt / completion | separate (s) | shared (s) | shared / separate |")
    print("|---|---:|---:|---:|---:|")
    for share in (0.875, 0.75, 0.625, 0.55, 0.5, 0.375, 0.25):
        p = round(args.tokens * share)
        c = args.tokens - p
        prompts, completions, kl_completions = rows(p), rows(c), rows(c)
        step_seconds(model, "separate", prompts, completions, kl_completions)  # warm-up
        best = {"separate": float("inf"), "shared": float("inf")}
        for _ in range(args.repeat):
            for layout in best:  # alternate: a slower moment of the machine hits both
                best[layout] = min(best[layout], step_seconds(model, layout, prompts, completions, kl_completions))
        print(f"| {p} : {c} | {p / c:.2f} | {best['separate']:.3f} | {best['shared']:.3f} | "
              f"{best['shared'] / best['separate']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
