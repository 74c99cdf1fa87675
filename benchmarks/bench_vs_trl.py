"""kto_lite against TRL's KTOTrainer on the same model, data, LoRA and schedule: time to the same epochs, memory.

    python benchmarks/bench_vs_trl.py --preset cpu|smollm2|smoke [--steps N] [--epochs E] [--batch-size B]
                                      [--grad-accum G] [--max-length T] [--no-4bit] [--repeat R]
                                      [--sides kto_lite,trl,...] [--threads N] [--workdir DIR] [--output FILE.md]

One invocation trains the preset's model on the preset's rows once per side, each side in its own
subprocess so that peak memories never mix, and prints one table:

- kto_lite:       `kto_lite.training.recipe.train(TrainConfig(...))` with a fresh $KTO_LITE_CACHE, so every
                  reference pass is paid and counted (read from status.json's "timing" when the
                  trainer writes it; otherwise timed around Trainer.fit / _reference / train_step);
- kto_pieces:     the same KTO step written out with kto_lite's pieces, as the reworked trainer does
                  it: reference log-probs of the examples once and of each epoch's KL rows
                  (compute_reference_logps, packed), length-matched KL partners, padding-free rows
                  when the model supports them (logps.supports_packing), completion_logps, kto_loss;
- trl:            TRL `KTOTrainer` with a `peft_config` and its defaults (reference = adapters off,
                  computed on every step);
- trl_precompute: the same with `precompute_ref_log_probs=True`;
- sft:            a plain supervised loop on the same batches: LoRA on the same base, `model(...,
                  labels=...)` (transformers' causal-LM loss over completion tokens, padded rows);
- sft_head:       kto_lite's own SFT step: the same loop with completion_logps on the rows kto_pieces
                  uses (packed when supported): what KTO itself adds is kto_pieces minus this.

Same on every side: the preset's base model loaded by `kto_lite.model.load_base` (4-bit NF4 or not,
compute dtype bf16 on GPU / fp32 on CPU), LoRA r/alpha on all linear layers, dropout 0, gradient
checkpointing as the preset says, AdamW (torch), lr, linear schedule without warmup, clipping 1.0,
batch size, accumulation, max_length, epochs and optimizer steps; bitsandbytes' CPU weight repacking
is switched off on every side (it corrupts gradients: bench_common.keep_4bit_layout_trainable_on_load).

Timed (wall clock and process CPU time), model loading and tokenization excluded: from the first
reference pass or step to the end of the last optimizer step, every reference pass included (TRL's
precompute runs in its __init__: added). tokens/s = non-padding prompt+completion tokens of the
training examples processed (KL rows not counted) / that time. Peak memory: the process's peak RSS
on CPU (high-water mark reset once the model is loaded, so it is the peak during training, weights
included), torch.cuda.max_memory_allocated on GPU. With --repeat R the sides run R times round-robin
and each side's fastest run is reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    PRESETS,
    REPO,
    Clock,
    Memory,
    build_model,
    demo_rows,
    hardware,
    keep_4bit_layout_trainable_on_load,
    make_rows,
    model_config,
    versions,
)

__all__ = ["PRESETS", "demo_rows", "make_rows", "model_config", "main"]
SIDES = ("kto_lite", "kto_pieces", "trl", "trl_precompute", "sft", "sft_head")
LABELS = {
    "kto_lite": "kto_lite (train)",
    "kto_pieces": "kto_lite pieces (packed KTO loop)",
    "trl": "TRL KTOTrainer (defaults)",
    "trl_precompute": "TRL, precompute_ref_log_probs",
    "sft": "SFT step (HF causal-LM loss)",
    "sft_head": "SFT step (kto_lite head, same rows)",
}
TARGETS = {  # issue 14, against TRL defaults: (min speed-up over the whole run, max peak memory ratio)
    "cpu": (6.0, 0.3),
    "smollm2": (2.5, None),
}
KTO_OVER_SFT = 1.4  # a KTO step (reference passes apart) at most this many of kto_lite's own SFT steps


# ============================================================================ the sides (each in a child process)
def child(side: str, spec_path: Path) -> None:
    """Run one side, write its result JSON next to the spec."""
    spec = json.loads(spec_path.read_text())
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cuda = spec["device"] == "cuda"
    memory, clock = Memory(cuda), Clock(cuda)
    repacks = keep_4bit_layout_trainable_on_load(allow_repack=spec["bnb_cpu_repack"])
    runner = {"kto_lite": run_kto_lite, "kto_pieces": run_kto_pieces, "trl": run_trl, "trl_precompute": run_trl,
              "sft": run_sft, "sft_head": run_sft}[side]
    extra = runner(side, spec, memory, clock)
    result = {"side": side, **clock.result(), "peak_mb": memory.peak_mb(), "loading_peak_mb": memory.loading_mb,
              "start_mb": memory.start_mb, "bnb_cpu_repacks": repacks[0],
              "torch_threads": torch.get_num_threads(), **extra}
    (spec_path.parent / f"result_{side}.json").write_text(json.dumps(result))


def train_config(spec: dict, **kw):
    from kto_lite.config import TrainConfig

    values = dict(model=spec["model_dir"], data=spec["data"], load_in_4bit=spec["load_in_4bit"],
                  lora_r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                  lora_target_modules="all-linear", gradient_checkpointing=spec["gradient_checkpointing"],
                  use_chat_template=False, learning_rate=spec["learning_rate"], lr_scheduler_type="linear",
                  warmup_ratio=0.0, max_grad_norm=1.0, optimizer="adamw_torch", batch_size=spec["batch_size"],
                  gradient_accumulation_steps=spec["gradient_accumulation_steps"], max_length=spec["max_length"],
                  max_prompt_length=spec["max_prompt_length"], num_epochs=spec["epochs"],
                  max_steps=spec["total_steps"], seed=spec["seed"], logging_steps=1, save_steps=0,
                  beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)  # TRL's defaults: the same loss
    values.update(kw)
    return TrainConfig(**values).resolved()


def _reset_after_loading(memory: Memory, clock: Clock) -> None:
    """Reset the memory high-water mark once kto_lite.model.load_base returns (model loaded)."""
    import kto_lite.model
    import kto_lite.training.recipe

    load_base = kto_lite.training.recipe.load_base

    def load_then_reset(*a, **kw):
        model = load_base(*a, **kw)
        memory.reset()
        return model

    kto_lite.model.load_base = kto_lite.training.recipe.load_base = load_then_reset


def run_kto_lite(side: str, spec: dict, memory: Memory, clock: Clock) -> dict:
    cache = Path(spec["workdir"]) / "kto_lite_cache"
    shutil.rmtree(cache, ignore_errors=True)  # fresh: every reference pass is part of the run
    os.environ["KTO_LITE_CACHE"] = str(cache)
    from kto_lite.runs import read_metrics
    from kto_lite.training import recipe as kto_train

    _reset_after_loading(memory, clock)
    hooked = _time_trainer_internals(kto_train, clock)
    out_dir = Path(spec["workdir"]) / "out_kto_lite"
    shutil.rmtree(out_dir, ignore_errors=True)
    kto_train.train(train_config(spec, output_dir=str(out_dir)), show_progress=False)
    timing = json.loads((out_dir / "status.json").read_text()).get("timing")
    if timing:  # the trainer's own account: reference passes vs training loop
        clock.start, clock.end = (0.0, 0.0), (timing["reference_seconds"] + timing["train_seconds"], 0.0)
        clock.outside, clock.reference = [0.0, 0.0], [timing["reference_seconds"], 0.0]
        clock.tokens, clock.steps = timing["tokens"], spec["total_steps"]
    elif not hooked:
        raise RuntimeError("kto_lite.training.recipe wrote no status.json 'timing' and has no Trainer.fit to time")
    result = {"losses": [row["loss"] for row in read_metrics(out_dir)], "timing_source":
              "status.json" if timing else "hooks"}
    if timing:
        result["cpu_unknown"] = True
        result["shared_prompts"] = timing.get("shared_prompts")
    return result


def _time_trainer_internals(kto_train, clock: Clock) -> bool:
    """Fallback for a trainer without status.json timing: time Trainer.fit, _reference and train_step."""
    trainer = getattr(kto_train, "Trainer", None)
    if trainer is None or not all(hasattr(trainer, n) for n in ("fit", "_reference", "train_step")):
        return False
    fit, reference, train_step = trainer.fit, trainer._reference, trainer.train_step

    def timed_fit(self, *a, **kw):
        clock.mark_start()
        return fit(self, *a, **kw)

    def timed_reference(self, split, epoch):
        if split.reference is not None and epoch in split.reference_kl:
            return reference(self, split, epoch)  # cached: no pass
        with clock.reference_pass(f"epoch {epoch + 1}"):
            return reference(self, split, epoch)

    def timed_step(self, step, meter):
        before = meter.tokens
        out = train_step(self, step, meter)
        clock.step_end(meter.tokens - before)
        return out

    trainer.fit, trainer._reference, trainer.train_step = timed_fit, timed_reference, timed_step
    return True


def _examples(spec: dict):
    from kto_lite.data import load_data, tokenize
    from kto_lite.model import load_tokenizer

    config = train_config(spec, output_dir=str(Path(spec["workdir"]) / "unused"))
    tokenizer = load_tokenizer(config.model)
    examples = tokenize(load_data(config.data, config.columns)[0], tokenizer, max_length=config.max_length,
                        max_prompt_length=config.max_prompt_length, use_chat_template=False)
    return config, tokenizer, examples


def _load(config, memory: Memory):
    import torch

    from kto_lite.model import add_lora, load_base

    torch.manual_seed(config.seed)
    model = add_lora(load_base(config.model, load_in_4bit=config.load_in_4bit), config)
    memory.reset()
    return model


def run_kto_pieces(side: str, spec: dict, memory: Memory, clock: Clock) -> dict:
    """The KTO step with kto_lite's pieces: what the reworked trainer runs (see the module docstring)."""
    import torch

    from kto_lite.model import compute_dtype, no_grad_policy
    from kto_lite.training.batching import collate, epoch_batches, kl_partners
    from kto_lite.training.logps import completion_logps, supports_packing
    from kto_lite.training.loss import kto_loss, z0_estimate
    from kto_lite.training.reference import REFERENCE_BATCH_MULTIPLIER, compute_reference_logps

    config, tokenizer, ex = _examples(spec)
    model = _load(config, memory)
    packed = supports_packing(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                  weight_decay=0.0)
    dtype, device, pad = compute_dtype(), next(model.parameters()).device, tokenizer.pad_token_id
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    ref_kw = dict(pad_token_id=pad, batch_size=REFERENCE_BATCH_MULTIPLIER * config.batch_size, show_progress=False)
    lengths = [len(e.prompt_ids) + len(e.completion_ids) for e in ex]
    gas, losses, per_epoch = config.gradient_accumulation_steps, [], spec["total_steps"] // spec["epochs"]
    clock.mark_start()
    with clock.reference_pass("examples"), autocast:
        reference = compute_reference_logps(model, [(e.prompt_ids, e.completion_ids) for e in ex], **ref_kw)
    for epoch in range(spec["epochs"]):
        partners = kl_partners(len(ex), seed=config.seed, epoch=epoch, lengths=[len(e.completion_ids) for e in ex])
        kl_completions = [ex[partners[i]].completion_ids[: config.max_length - len(e.prompt_ids)]
                          for i, e in enumerate(ex)]
        with clock.reference_pass(f"KL rows, epoch {epoch + 1}"), autocast:
            reference_kl = compute_reference_logps(model, [(e.prompt_ids, c) for e, c in zip(ex, kl_completions)],
                                                   **ref_kw)
        batches = epoch_batches(lengths, [e.label for e in ex], config.batch_size, seed=config.seed, epoch=epoch)
        model.train()
        for step in range(per_epoch):
            step_loss, tokens = 0.0, 0
            for idx in batches[step * gas : (step + 1) * gas]:
                prompts = [ex[i].prompt_ids for i in idx]
                rows = collate(prompts, [ex[i].completion_ids for i in idx], pad, packed=packed).to(device)
                kl_rows = collate(prompts, [kl_completions[i] for i in idx], pad, packed=packed).to(device)
                with autocast:
                    policy = completion_logps(model, rows)  # (B,) with grad
                    with no_grad_policy(model):
                        policy_kl = completion_logps(model, kl_rows)
                out = kto_loss(policy, reference[idx].to(device), torch.tensor([ex[i].label for i in idx], device=device),
                               z0=z0_estimate(policy_kl, reference_kl[idx].to(device)), beta=config.beta)
                (out.loss / gas).backward()
                step_loss += float(out.loss) / gas
                tokens += rows.tokens()
            _optimizer_step(model, optimizer)
            losses.append(step_loss)
            clock.step_end(tokens)
    return {"losses": losses, "packed": packed, "kl_padding": kl_padding(ex, config, packed)}


def _optimizer_step(model, optimizer) -> None:
    import torch

    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def kl_padding(ex, config, packed: bool) -> dict:
    """Positions / real tokens of the KL rows of epoch 0's batches: random partners, length-matched, packed."""
    from kto_lite.training.batching import epoch_batches, kl_partners

    lengths = [len(e.prompt_ids) + len(e.completion_ids) for e in ex]
    batches = epoch_batches(lengths, [e.label for e in ex], config.batch_size, seed=config.seed, epoch=0)

    def ratio(partners):
        positions = real = 0
        for batch in batches:
            kl = [min(config.max_length, len(ex[i].prompt_ids) + len(ex[partners[i]].completion_ids)) for i in batch]
            positions, real = positions + max(kl) * len(kl), real + sum(kl)
        return positions / real

    similar = kl_partners(len(ex), seed=config.seed, epoch=0, lengths=[len(e.completion_ids) for e in ex])
    return {"random": ratio(kl_partners(len(ex), seed=config.seed, epoch=0)), "similar": ratio(similar),
            "examples": ratio(list(range(len(ex)))), "packed": packed}


def run_trl(side: str, spec: dict, memory: Memory, clock: Clock) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import KTOConfig, KTOTrainer

    from kto_lite.model import compute_dtype, load_base

    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = load_base(spec["model_dir"], load_in_4bit=spec["load_in_4bit"])  # the very same loading as kto_lite
    memory.reset()
    dtype = compute_dtype()
    args = KTOConfig(
        output_dir=str(Path(spec["workdir"]) / f"out_{side}"), per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["gradient_accumulation_steps"], max_steps=spec["total_steps"],
        num_train_epochs=spec["epochs"], max_length=spec["max_length"], learning_rate=spec["learning_rate"],
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        seed=spec["seed"], bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        gradient_checkpointing=spec["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        precompute_ref_log_probs=side == "trl_precompute")
    peft_config = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    precompute = KTOTrainer._precompute_ref_logps

    def timed_precompute(self, *a, **kw):
        with clock.reference_pass("TRL precompute", outside=clock.start is None):  # in __init__: before start
            return precompute(self, *a, **kw)

    KTOTrainer._precompute_ref_logps = timed_precompute

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.step_end()

    trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Steps()])
    clock.mark_start()
    trainer.train()
    clock.tokens = int(trainer._total_train_tokens)  # attention_mask sums of the batches: non-pad tokens
    return {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def run_sft(side: str, spec: dict, memory: Memory, clock: Clock) -> dict:
    """Supervised fine-tuning on the same examples and batches, same LoRA and optimizer."""
    import torch

    from kto_lite.model import compute_dtype
    from kto_lite.training.batching import collate, epoch_batches
    from kto_lite.training.logps import completion_logps, supports_packing

    config, tokenizer, ex = _examples(spec)
    model = _load(config, memory)
    packed = side == "sft_head" and supports_packing(model)  # the rows kto_pieces trains on
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                  weight_decay=0.0)
    dtype, device = compute_dtype(), next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    lengths = [len(e.prompt_ids) + len(e.completion_ids) for e in ex]
    gas, losses, per_epoch = config.gradient_accumulation_steps, [], spec["total_steps"] // spec["epochs"]
    model.train()
    clock.mark_start()
    for epoch in range(spec["epochs"]):
        batches = epoch_batches(lengths, [e.label for e in ex], config.batch_size, seed=config.seed, epoch=epoch)
        for step in range(per_epoch):
            step_loss, tokens = 0.0, 0
            for idx in batches[step * gas : (step + 1) * gas]:
                rows = collate([ex[i].prompt_ids for i in idx], [ex[i].completion_ids for i in idx],
                               tokenizer.pad_token_id, packed=packed).to(device)
                with autocast:
                    if side == "sft":  # what a plain SFT loop does: full (B, T, V) logits, transformers' loss
                        labels = rows.input_ids.masked_fill(rows.completion_mask == 0, -100)
                        loss = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, labels=labels).loss
                    else:  # kto_lite's head: only completion positions, in chunks
                        loss = -completion_logps(model, rows).sum() / rows.completion_lengths().sum().clamp(min=1)
                (loss / gas).backward()
                step_loss += float(loss) / gas
                tokens += rows.tokens()
            _optimizer_step(model, optimizer)
            losses.append(step_loss)
            clock.step_end(tokens)
    return {"losses": losses, "packed": packed}


# ============================================================================ the parent: run, compare, print
def run_side(side: str, spec_path: Path, log: Path) -> dict:
    threads = json.loads(spec_path.read_text()).get("threads")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    if threads:  # OpenMP pools outside torch (bitsandbytes' CPU kernels) too
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", side, str(spec_path)],
                              stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    result_path = spec_path.parent / f"result_{side}.json"
    if proc.returncode != 0 or not result_path.is_file():
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{side} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    return json.loads(result_path.read_text())


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def secs(x: float | None) -> str:
    return "-" if x is None else (f"{x:.1f}" if x >= 10 else f"{x:.2f}")


def format_results(results: dict[str, dict], spec: dict, title: str, preset_name: str) -> str:
    base = results.get("trl")
    gpu = spec["device"] == "cuda"
    mem = "peak GPU mem (MiB)" if gpu else "peak RSS (MiB)"
    cpu_cols = "" if gpu else " CPU time (s) |"
    lines = [title, "",
             f"| run | time (s) |{cpu_cols} of which reference passes (s) | tokens/s | speed-up vs TRL default | "
             f"{mem} | vs TRL default | added by training (MiB) | step-1 loss |",
             "|---|" + "---:|" * (8 if gpu else 9)]
    for side, r in results.items():
        tps = r["tokens"] / r["seconds"]
        reference = secs(r["reference_seconds"]) if side not in ("trl", "sft", "sft_head") else "-"
        loss = f"{r['losses'][0]:.4f}" if r["losses"] and side.startswith(("kto", "trl")) else "-"
        cpu = "" if gpu else f" {secs(None if r.get('cpu_unknown') else r['cpu_seconds'])} |"
        lines.append(f"| {LABELS[side]} | {secs(r['seconds'])} |{cpu} {reference} | {tps:,.0f} | "
                     f"{ratio(base and base['seconds'], r['seconds'])} | {r['peak_mb']:,.0f} | "
                     f"{ratio(r['peak_mb'], base and base['peak_mb'])} | {r['peak_mb'] - r['start_mb']:,.0f} | {loss} |")
    lines.append("")
    tokens = ", ".join(f"{side} {r['tokens']:,}" for side, r in results.items())
    lines.append(f"- Tokens trained on: {tokens} ({spec['examples']} examples x {spec['epochs']} epoch(s), "
                 f"{spec['total_steps']} steps of {spec['batch_size']} x {spec['gradient_accumulation_steps']}).")
    if any(len(r.get("all_seconds", [])) > 1 for r in results.values()):
        times = "; ".join(f"{side} " + ", ".join(f"{t:.1f}" for t in r["all_seconds"]) for side, r in results.items())
        lines.append(f"- Wall times of every round (s), the fastest reported above: {times}.")
    for side in ("kto_lite", "kto_pieces", "trl_precompute"):
        r = results.get(side)
        if r and r.get("reference_passes"):
            passes = ", ".join(f"{what} {seconds:.1f} s" for what, seconds in r["reference_passes"])
            lines.append(f"- Reference passes of {LABELS[side]}: {passes}: {100 * r['reference_seconds'] / r['seconds']:.0f}% "
                         f"of its wall time.")
    shared = (results.get("kto_lite") or {}).get("shared_prompts")
    if shared:
        lines.append(f"- kto_lite (train) scored each prompt once for its completion and KL rows "
                     f"(share_prompts, docs/performance.md section 5): reference passes "
                     f"{'yes' if shared['reference'] else 'no'}, training steps {'yes' if shared['training'] else 'no'}"
                     f"; kto_lite pieces scores them separately.")
    pieces = results.get("kto_pieces")
    if pieces and pieces.get("kl_padding"):
        k = pieces["kl_padding"]
        lines.append(f"- KL rows, padded positions / real tokens (epoch 1's batches): random partners "
                     f"{k['random']:.2f}, length-matched partners {k['similar']:.2f} (the examples themselves: "
                     f"{k['examples']:.2f}); packed rows: 1.00{' (used here)' if k['packed'] else ' (not used here)'}.")
    loading = [r["loading_peak_mb"] for r in results.values() if r.get("loading_peak_mb")]
    if loading:
        lines.append(f"- Peak memory while loading the model (before training, excluded above): "
                     f"{min(loading):,.0f}-{max(loading):,.0f} MiB.")
    repacked = [s for s, r in results.items() if r.get("bnb_cpu_repacks")]
    if repacked:
        lines.append(f"- WARNING: bitsandbytes repacked 4-bit weights for its CPU inference kernel in: "
                     f"{', '.join(repacked)}: backward then drops the gradient through the frozen 4-bit matmuls.")
    head = results.get("sft_head")
    for side in ("kto_lite", "kto_pieces"):
        kto = results.get(side)
        if kto and head:
            parts = []
            for prefix, unit in (("", "wall"), ("cpu_", "CPU time")) if not gpu else (("", "wall"),):
                if prefix and kto.get("cpu_unknown"):
                    continue
                per_step = head[f"{prefix}step_seconds"] / head["steps"]
                parts.append(f"{unit} {kto[f'{prefix}step_seconds'] / kto['steps'] / per_step:.2f}x "
                             f"({kto[f'{prefix}seconds'] / kto['steps'] / per_step:.2f}x with its reference passes)")
            lines.append(f"- KTO step / kto_lite's SFT step ({LABELS[side]}, reference passes apart; target <= "
                         f"{KTO_OVER_SFT}x): " + "; ".join(parts) + ".")
    kto, base = results.get("kto_lite"), results.get("trl")
    if kto and head and base:  # what no exact KTO run can do without: the SFT step's work and one reference pass
        floor = head["seconds"] + kto["reference_seconds"]
        lines.append(f"- Ceiling: a KTO run does at least kto_lite's SFT step on these rows ({secs(head['seconds'])} s) "
                     f"and one reference pass over them and the KL rows ({secs(kto['reference_seconds'])} s, each "
                     f"prompt and completion scored once, no grad): {secs(floor)} s, so at most "
                     f"{base['seconds'] / floor:.2f}x faster than TRL's default here, were the KL rows free in training.")
    losses = {s: r["losses"][0] for s, r in results.items() if s.startswith(("kto", "trl")) and r["losses"]}
    if losses:
        lines.append("- Step-1 losses (policy == reference, so 0.5 expected on each side): "
                     + ", ".join(f"{s} {v:.6f}" for s, v in losses.items()) + ".")
    lines.append(targets_line(results, preset_name))
    if not gpu and all("cpu_seconds" in r and not r.get("cpu_unknown") for r in results.values()):
        lines.append(targets_line(results, preset_name, "cpu_"))
    return "\n".join(lines)


def targets_line(results: dict[str, dict], preset_name: str, prefix: str = "") -> str:
    """The issue-14 targets, in wall time (prefix "") or process CPU time ("cpu_", less disturbed on a shared machine)."""
    base, head = results.get("trl"), results.get("sft_head")
    speed, memory = TARGETS.get(preset_name, (None, None))
    checks = []
    for side in ("kto_lite", "kto_pieces"):
        kto = results.get(side)
        if not kto:
            continue
        if base and speed:
            got = base[f"{prefix}seconds"] / kto[f"{prefix}seconds"]
            checks.append(f"{side} >= {speed:g}x faster than TRL: {'met' if got >= speed else 'MISSED'} ({got:.2f}x)")
        if base and memory:
            got = kto["peak_mb"] / base["peak_mb"]
            checks.append(f"{side} peak memory <= {memory:g}x TRL: {'met' if got <= memory else 'MISSED'} ({got:.2f}x)")
        if head:
            got = (kto[f"{prefix}step_seconds"] / kto["steps"]) / (head[f"{prefix}step_seconds"] / head["steps"])
            checks.append(f"{side} KTO step <= {KTO_OVER_SFT}x SFT step: {'met' if got <= KTO_OVER_SFT else 'MISSED'} "
                          f"({got:.2f}x)")
    unit = "CPU time" if prefix else "wall time"
    return f"- Targets ({unit}): " + ("; ".join(checks) if checks else "none for this preset") + "."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, help="optimizer steps per epoch (default: the preset's)")
    parser.add_argument("--epochs", type=int, help="epochs (default: the preset's)")
    parser.add_argument("--batch-size", type=int, help="examples per micro-batch (default: the preset's)")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default: the preset's)")
    parser.add_argument("--max-length", type=int, help="longest prompt+completion in tokens (default: the preset's)")
    parser.add_argument("--no-4bit", action="store_true", help="unquantized base on every side")
    parser.add_argument("--allow-bnb-cpu-repack", action="store_true",
                        help="let bitsandbytes repack 4-bit weights for its CPU inference kernel (off by default on "
                             "every side: it corrupts gradients)")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    parser.add_argument("--threads", type=int,
                        help="CPU threads per side (torch and OpenMP); default 1 for CPU presets, so that a run "
                             "on a shared machine neither hogs it nor suffers from thread convoys; 0: torch's default")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every side this many times (round-robin) and report each side's fastest run")
    parser.add_argument("--output", help="append the table (with date, hardware, versions) to this Markdown file")
    parser.add_argument("--workdir", help="keep the model, data, logs and results here (default: a temporary folder)")
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "SPEC"), help=argparse.SUPPRESS)
    parser.add_argument("--render", metavar="WORKDIR", help=argparse.SUPPRESS)  # re-print a workdir's last results
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return 0
    if args.render:
        root = Path(args.render)
        spec = json.loads((root / "spec.json").read_text())
        results = {s: json.loads((root / f"result_{s}.json").read_text()) for s in SIDES
                   if (root / f"result_{s}.json").is_file()}
        print(format_results(results, spec, f"### {args.preset} (results of {root})", args.preset))
        return 0

    preset = PRESETS[args.preset]
    preset = replace(preset, steps=args.steps or preset.steps, epochs=args.epochs or preset.epochs,
                     batch_size=args.batch_size or preset.batch_size,
                     gradient_accumulation_steps=args.grad_accum or preset.gradient_accumulation_steps,
                     max_length=args.max_length or preset.max_length,
                     load_in_4bit=preset.load_in_4bit and not args.no_4bit)
    if args.max_length:
        preset = replace(preset, max_prompt_length=min(preset.max_prompt_length, args.max_length // 2))
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = set(sides) - set(SIDES)
    if unknown:
        parser.error(f"unknown side(s) {', '.join(sorted(unknown))}; choose from {', '.join(SIDES)}")
    import torch

    if preset.device == "cuda" and not torch.cuda.is_available():
        print(f"error: preset {args.preset!r} ({preset.note}) needs a CUDA GPU and none is available here; "
              "use --preset cpu (or smoke) on this machine", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="bench_vs_trl_") as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        model_dir = root / f"model_{args.preset}"
        print(f"preparing the {args.preset} model ({preset.note}) ...", flush=True)
        model_dir = build_model(preset, model_dir)
        per_step = preset.batch_size * preset.gradient_accumulation_steps
        if preset.rows == "demo":
            rows = demo_rows(model_dir)
            steps = args.steps or len(rows) // per_step
            rows = rows[: steps * per_step]  # whole optimizer steps: every side sees every row each epoch
        else:
            steps = preset.steps
            rows = make_rows(preset, steps * per_step)
        data = root / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = {**asdict(preset), "model_dir": str(model_dir), "data": str(data), "workdir": str(root),
                "threads": args.threads if args.threads is not None else int(preset.device == "cpu"),
                "bnb_cpu_repack": args.allow_bnb_cpu_repack, "examples": len(rows),
                "total_steps": steps * preset.epochs}
        spec_path = root / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for stale in root.glob("result_*.json"):
            stale.unlink()
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for round_ in range(args.repeat):  # round-robin, so that every side meets the machine's quiet and busy moments
            for side in sides:
                print(f"running {LABELS[side]}" + (f" (round {round_ + 1}/{args.repeat})" if args.repeat > 1 else "")
                      + " ...", flush=True)
                r = run_side(side, spec_path, root / f"log_{side}.txt")
                runs[side].append(r)
                print(f"  {r['seconds']:.1f} s, peak {r['peak_mb']:,.0f} MiB", flush=True)
        results = {}
        for side, rs in runs.items():  # the fastest run: the one least slowed down by other processes
            results[side] = {**min(rs, key=lambda r: r["seconds"]), "all_seconds": [r["seconds"] for r in rs]}
        threads = results[sides[0]]["torch_threads"]

    cuda = preset.device == "cuda"
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    quantization = "4-bit NF4" if preset.load_in_4bit else "unquantized fp32" if not cuda else "unquantized"
    title = (f"### {args.preset}: {datetime.date.today().isoformat()}, {hardware(cuda)}{load}\n\n"
             f"{preset.note}; {quantization} base, LoRA r={preset.lora_r} alpha={preset.lora_alpha} all-linear, "
             f"batch {preset.batch_size} x {preset.gradient_accumulation_steps} accumulation, max_length "
             f"{preset.max_length}, {preset.epochs} epoch(s) of {steps} steps, gradient checkpointing "
             f"{'on' if preset.gradient_checkpointing else 'off'}, {threads} CPU thread(s) per side"
             f"{f', fastest of {args.repeat} rounds' if args.repeat > 1 else ''}. {versions()}.")
    table = format_results(results, spec, title, args.preset)
    print("\n" + table)
    if args.output:
        with open(args.output, "a") as f:
            f.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
