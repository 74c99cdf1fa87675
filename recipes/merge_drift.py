"""How far each merge is from the trained (4-bit) model: the numbers in docs/export.md.

Trains a small QLoRA adapter with KTO on a few demo rows, then compares, on held-out rows, the
per-token log-probs of the trained model (4-bit base + adapter) with those of
  - the quantized merge (update added to the de-quantized NF4 weights), stored in fp32 / bf16 / fp16,
  - the full merge (update added to the original weights), stored the same ways.
Mean |Δ log p| per completion token, nats. Then greedy answers to held-out questions of the demo task
(kto_lite.demo.task: eval split, judged by its program): how many are the trained model's own answer,
and how many the judge accepts.

    python recipes/merge_drift.py --model demo --steps 40
    python recipes/merge_drift.py --model smollm2 --steps 40      # SmolLM2-135M-Instruct (tests/real_model.py)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from kto_lite.config import TrainConfig  # noqa: E402
from kto_lite.demo import DEMO_SAMPLES  # noqa: E402
from kto_lite.export.merge import drift_rows, load_trained, logprob_drift, merge, token_logps  # noqa: E402
from kto_lite.model import load_tokenizer  # noqa: E402
from kto_lite.training.recipe import train  # noqa: E402


def split_rows(n_train: int, n_held: int, folder: Path) -> tuple[Path, Path]:
    source = next(p for p in DEMO_SAMPLES.values() if p.name == "demo_kto.jsonl")
    lines = source.read_text().splitlines()
    train_file, held_file = folder / "train.jsonl", folder / "held.jsonl"
    train_file.write_text("\n".join(lines[:n_train]) + "\n")
    held_file.write_text("\n".join(lines[-n_held:]) + "\n")
    return train_file, held_file


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], n: int = 16) -> list[str]:
    """The greedy completion of each prompt (chat template as in training), KV cache on."""
    from kto_lite.data import encode_prompt

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.config.use_cache = True  # load_base turns it off for training
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = encode_prompt(prompt, tokenizer)
        y = model.generate(input_ids=torch.tensor([ids], device=device), max_new_tokens=n, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(y[0, len(ids):], skip_special_tokens=True))
    return out


def compare(model, tokenizer, rows, reference, prompts, reference_answers) -> dict:
    from kto_lite.demo.task import judge

    answers = greedy_answers(model, tokenizer, prompts)
    return {"drift": logprob_drift(reference, token_logps(model, rows)),
            "same_answers": sum(a == b for a, b in zip(answers, reference_answers)),
            "judged_right": sum(judge(p, a) for p, a in zip(prompts, answers))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="demo", help="demo, smollm2, or a model folder")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--held_out", type=int, default=32, help="held-out data rows for the log-prob drift")
    p.add_argument("--questions", type=int, default=64, help="held-out demo questions for the greedy answers")
    args = p.parse_args()
    model = {"demo": None}.get(args.model, args.model)
    if args.model == "smollm2":
        from real_model import smollm2_dir

        model = str(smollm2_dir())
    work = Path(tempfile.mkdtemp(prefix="merge_drift-"))
    train_file, held_file = split_rows(128, args.held_out, work)
    config = TrainConfig(model=model, data=str(train_file), eval_data=str(held_file), output_dir=str(work / "run"),
                         max_steps=args.steps, batch_size=4, gradient_accumulation_steps=1, max_length=128,
                         learning_rate=args.learning_rate, lora_r=8, eval_steps=10_000, save_steps=0, seed=0)
    run = train(config, show_progress=False)

    from kto_lite.demo.task import make_prompts

    tokenizer = load_tokenizer(str(run))
    rows = drift_rows(run, tokenizer, n=args.held_out)  # eval_data: rows not trained on
    prompts = make_prompts(args.questions, seed=0, split="eval")  # questions never trained on
    trained = load_trained(run)
    reference = token_logps(trained, rows)
    reference_answers = greedy_answers(trained, tokenizer, prompts)
    results = {"trained (4-bit + adapter)": compare(trained, tokenizer, rows, reference, prompts, reference_answers)}
    with trained.disable_adapter():  # the base alone: the scale of what the adapter does
        results["base (adapter off)"] = compare(trained, tokenizer, rows, reference, prompts, reference_answers)
    del trained
    for merge_from in ("quantized", "full"):
        for dtype in ("fp32", "bf16", "fp16"):
            merged = merge(run, merge_from=merge_from, dtype=dtype)
            results[f"{merge_from} {dtype}"] = compare(merged.model.float(), tokenizer, rows, reference, prompts,
                                                       reference_answers)
            del merged
    print(json.dumps({"model": args.model, "steps": args.steps, "held_out_rows": len(rows),
                      "tokens": int(sum(r.numel() for r in reference)), "questions": len(prompts),
                      "results": results}, indent=1))
    for name, r in results.items():
        print(f"{name:26s} mean |Δ log p| {r['drift']:.4f}   same greedy answer {r['same_answers']}/{len(prompts)}"
              f"   judged right {r['judged_right']}/{len(prompts)}")


if __name__ == "__main__":
    main()
