"""kto_lite's GPU paths in a few minutes on any CUDA GPU, with random-weight models of real shapes.

    python benchmarks/gpu_check.py [--models qwen2.5-0.5b,gemma-2-2b] [--steps 6] [--no-trl] [--no-fsdp]
                                   [--workdir DIR] [--output FILE.md]

Nothing is downloaded: each model is built from its real config (Qwen2.5-0.5B: sdpa, 152k vocabulary,
tied head; Gemma-2-2B: eager attention with soft-capping, sliding window, 256k vocabulary) with random
weights. For each model and each precision the GPU has natively (bf16 on compute capability >= 8.0,
fp16 with loss scaling everywhere), one child process:
- loads the base in 4-bit NF4 (bitsandbytes) and checks every decoder linear is a Linear4bit;
- adds LoRA, takes paged 8-bit AdamW (bitsandbytes), runs `--steps` KTO steps the way the trainer does
  (reference log-probs precomputed in packed batches, length-matched KL partners, padding-free rows
  when logps.supports_packing says so, fp16: torch.amp.GradScaler), and checks losses and gradient
  norms are finite;
- checks the output head against the model's own forward in that dtype, and packed log-probs against
  padded ones;
- measures tokens/s and peak memory (torch.cuda.max_memory_allocated) against `estimate`
  (kto_lite.memory.estimate_memory for the same config and GPU).
Then, where TRL is installed, bench_vs_trl.py on the qwen2.5-0.5b preset (kto_lite pieces, TRL
KTOTrainer, kto_lite's SFT step), and, unless --no-fsdp and with 2+ GPUs, `torchrun -m kto_lite train
--fsdp true` on 2 processes (sharded QLoRA training: losses, weights per process, peak memory). It
prints a Markdown report (--output appends it to a file under benchmarks/results/).

Without CUDA it refuses (exit 2). On a machine without bitsandbytes (or TRL), carry them as wheels;
see benchmarks/README.md ("gpu_check.py").
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import PRESETS, REPO, Preset, hardware, make_rows, versions  # noqa: E402

MODELS: dict[str, Preset] = {
    "qwen2.5-0.5b": replace(PRESETS["qwen2.5-0.5b"], batch_size=8, gradient_accumulation_steps=1),
    "gemma-2-2b": Preset("gemma2", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                                        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                                        head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                        tie_word_embeddings=True, max_position_embeddings=8192),
                         "cuda", steps=6, batch_size=4, gradient_accumulation_steps=1, max_length=1024,
                         max_prompt_length=512, prompt_tokens=(160, 0.8), completion_tokens=(220, 0.8),
                         note="Gemma-2-2B shape, random weights"),
}
# a dry run of the same code on CPU, for the test suite only: tiny model, fp32, no bitsandbytes optimizer
DRY_RUN = replace(PRESETS["smoke"], steps=2)


# ============================================================================ one model, one precision (child)
def build(preset: Preset, path: Path) -> Path:
    """Random weights of the preset's shape (bf16 on the GPU), saved with a word-level tokenizer."""
    if (path / "config.json").is_file():
        return path
    import torch
    from bench_common import SPECIALS, build_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = {f"{n}_token_id": SPECIALS.index(t) for n, t in (("pad", "<pad>"), ("bos", "<s>"), ("eos", "</s>"))}
    config = AutoConfig.for_model({"gemma2": "gemma2", "qwen2": "qwen2", "llama": "llama"}[preset.arch],
                                  **preset.shape, **ids)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(preset.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    build_tokenizer(preset.shape["vocab_size"]).save_pretrained(path)
    del model
    return path


def check_one(spec: dict) -> dict:
    """Load in 4-bit, check the head and packing, run KTO steps; a dict of measurements."""
    import torch

    import kto_lite.model as kto_model
    from kto_lite.config import TrainConfig
    from kto_lite.data import load_data, tokenize
    from kto_lite.memory import CUDA_OVERHEAD_BYTES, estimate_memory
    from kto_lite.training.batching import collate, epoch_batches, kl_partners
    from kto_lite.training.logps import completion_logps, supports_packing
    from kto_lite.training.loss import kto_loss, z0_estimate
    from kto_lite.training.reference import REFERENCE_BATCH_MULTIPLIER, compute_reference_logps

    cuda = spec["device"] == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[spec["precision"]]
    kto_model.compute_dtype = lambda: dtype  # the precision under test, whatever the GPU would pick
    config = TrainConfig(model=spec["model_dir"], data=spec["data"], batch_size=spec["batch_size"],
                         max_length=spec["max_length"], max_prompt_length=spec["max_prompt_length"],
                         lora_r=16, lora_alpha=32, lora_dropout=0.0, learning_rate=5e-5, use_chat_template=False,
                         load_in_4bit=cuda, optimizer="paged_adamw_8bit" if cuda else "adamw_torch").resolved()
    tokenizer = kto_model.load_tokenizer(config.model)
    ex = tokenize(load_data(config.data, config.columns)[0], tokenizer, max_length=config.max_length,
                  max_prompt_length=config.max_prompt_length, use_chat_template=False)
    out: dict = {"model": spec["name"], "precision": spec["precision"]}

    # ---- 4-bit load
    base = kto_model.load_base(config.model, load_in_4bit=config.load_in_4bit)
    linears = [m for n, m in base.named_modules() if n.rsplit(".", 1)[-1].endswith("_proj")]
    out["linear_4bit"] = f"{sum(type(m).__name__ == 'Linear4bit' for m in linears)}/{len(linears)}"
    model = kto_model.add_lora(base, config)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(params, lr=config.learning_rate)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    # ---- the head and packing, against the model's own forward / padded rows
    packed = supports_packing(model)
    out["packing"] = f"{packed} ({model.get_base_model().config._attn_implementation})"
    sample = ex[:2]  # the model's own forward holds (rows x T x V) fp32 logits
    padded_rows = collate([e.prompt_ids for e in sample], [e.completion_ids for e in sample], tokenizer.pad_token_id)
    with torch.no_grad(), autocast, kto_model.no_grad_policy(model):
        ours = completion_logps(model, padded_rows.to(device))
        logits = model(input_ids=padded_rows.input_ids.to(device),
                       attention_mask=padded_rows.attention_mask.to(device)).logits.float()
        own = (logits[:, :-1].log_softmax(-1).gather(-1, padded_rows.input_ids[:, 1:, None].to(device)).squeeze(-1)
               * padded_rows.completion_mask[:, 1:].to(device)).sum(-1)
        del logits
        packed_logps = completion_logps(model, collate([e.prompt_ids for e in sample],
                                                       [e.completion_ids for e in sample], tokenizer.pad_token_id,
                                                       packed=True).to(device))
    scale = own.abs().max().item()
    out["head_vs_forward"] = (ours - own).abs().max().item() / scale
    out["packed_vs_padded"] = (packed_logps - ours).abs().max().item() / scale

    # ---- KTO steps as the trainer runs them
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    begin = time.perf_counter()
    ref_kw = dict(pad_token_id=tokenizer.pad_token_id, batch_size=REFERENCE_BATCH_MULTIPLIER * config.batch_size,
                  show_progress=False)
    partners = kl_partners(len(ex), seed=0, epoch=0, lengths=[len(e.completion_ids) for e in ex])
    kl_completions = [ex[partners[i]].completion_ids[: config.max_length - len(e.prompt_ids)] for i, e in enumerate(ex)]
    with autocast:
        reference = compute_reference_logps(model, [(e.prompt_ids, e.completion_ids) for e in ex], **ref_kw)
        reference_kl = compute_reference_logps(model, [(e.prompt_ids, c) for e, c in zip(ex, kl_completions)], **ref_kw)
    reference_seconds = time.perf_counter() - begin
    batches = epoch_batches([len(e.prompt_ids) + len(e.completion_ids) for e in ex], [e.label for e in ex],
                            config.batch_size, seed=0, epoch=0)
    model.train()
    losses, norms, tokens = [], [], 0
    step_begin = time.perf_counter()
    for idx in batches[: spec["steps"]]:
        prompts = [ex[i].prompt_ids for i in idx]
        rows = collate(prompts, [ex[i].completion_ids for i in idx], tokenizer.pad_token_id, packed=packed).to(device)
        kl_rows = collate(prompts, [kl_completions[i] for i in idx], tokenizer.pad_token_id, packed=packed).to(device)
        with autocast:
            policy = completion_logps(model, rows)
            with kto_model.no_grad_policy(model):
                policy_kl = completion_logps(model, kl_rows)
        result = kto_loss(policy, reference[idx].to(device), torch.tensor([ex[i].label for i in idx], device=device),
                          z0=z0_estimate(policy_kl, reference_kl[idx].to(device)), beta=0.1)
        scaler.scale(result.loss).backward()
        scaler.unscale_(optimizer)
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(result.loss))
        tokens += rows.tokens()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - step_begin
    out.update(steps=len(losses), finite=all(math.isfinite(v) for v in losses + norms), loss=losses[-1],
               grad_norm=norms[-1], tokens_per_second=tokens / seconds, reference_seconds=reference_seconds)
    if cuda:
        from transformers import AutoConfig

        estimate = estimate_memory(config, AutoConfig.from_pretrained(config.model).to_dict(), device="cuda",
                                   gpu_name=torch.cuda.get_device_name(), compute_dtype=str(dtype).split(".")[1])
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["estimate_mib"] = (estimate.total - CUDA_OVERHEAD_BYTES) / 2**20  # max_memory_allocated has no context
    return out


# ============================================================================ the parent
def run_child(spec: dict, workdir: Path) -> dict:
    spec_path = workdir / f"spec_{spec['name']}_{spec['precision']}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    result_path = spec_path.with_suffix(".result.json")
    if proc.returncode != 0 or not result_path.is_file():
        return {"model": spec["name"], "precision": spec["precision"],
                "error": (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    return json.loads(result_path.read_text())


def run_fsdp(model_dir: Path, data: Path, precision: str, workdir: Path) -> str:
    """`torchrun ... -m kto_lite train --fsdp true` on min(2, GPUs) processes: a line for the report."""
    import torch

    processes = min(2, torch.cuda.device_count())
    if processes < 2:
        return "- FSDP QLoRA: skipped (it shards across processes, one per GPU; this machine has one GPU)."
    out = workdir / "fsdp_run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m", "kto_lite",
               "train", "--model", str(model_dir), "--data", str(data), "--output_dir", str(out), "--fsdp", "true",
               "--mixed_precision", precision, "--max_steps", "2", "--gradient_accumulation_steps", "1",
               "--overwrite_output_dir", "true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    sys.path.insert(0, str(REPO))
    from kto_lite.runs import read_metrics, read_status

    status = read_status(out) or {}
    if proc.returncode != 0 or status.get("status") != "finished":
        tail = " / ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        return f"- FSDP QLoRA ({processes} process(es), {precision}): FAILED: {tail}"
    from transformers import AutoConfig

    from kto_lite.config import TrainConfig
    from kto_lite.memory import CUDA_OVERHEAD_BYTES, estimate_memory

    rows = read_metrics(out)
    estimate = estimate_memory(TrainConfig.load(out / "config.yaml"), AutoConfig.from_pretrained(model_dir).to_dict(),
                               gpu_name=torch.cuda.get_device_name(), processes=processes)
    return (f"- FSDP QLoRA (`--fsdp true`, {processes} process(es), {precision}): 2 steps, losses "
            f"{', '.join(format(r['loss'], '.4f') for r in rows)}, weights per process "
            f"{status['timing'].get('fsdp_weights_per_process')}, peak {max(r['peak_memory_mb'] for r in rows):,.0f} "
            f"MiB on the main GPU (`estimate --fsdp true --processes {processes}`: "
            f"{(estimate.total - CUDA_OVERHEAD_BYTES) / 2**20:,.0f} MiB without the CUDA context).")


def table(results: list[dict]) -> list[str]:
    lines = ["| model | precision | 4-bit linears | packing | head vs own forward | packed vs padded | steps finite | "
             "tokens/s | ref. pass (s) | peak MiB | estimate MiB | peak / estimate |",
             "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['precision']} | FAILED: {' '.join(r['error'])} |" + " |" * 9)
            continue
        peak, est = r.get("peak_mib"), r.get("estimate_mib")
        lines.append(f"| {r['model']} | {r['precision']} | {r['linear_4bit']} | {r['packing']} | "
                     f"{r['head_vs_forward']:.1e} | {r['packed_vs_padded']:.1e} | {r['finite']} ({r['steps']}) | "
                     f"{r['tokens_per_second']:,.0f} | {r['reference_seconds']:.1f} | "
                     f"{f'{peak:,.0f}' if peak else '-'} | {f'{est:,.0f}' if est else '-'} | "
                     f"{f'{peak / est:.2f}' if peak and est else '-'} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=6, help="KTO steps per model and precision")
    parser.add_argument("--no-trl", action="store_true", help="skip the comparison with TRL's KTOTrainer")
    parser.add_argument("--no-fsdp", action="store_true", help="skip the FSDP QLoRA launch")
    parser.add_argument("--workdir", help="keep the random models and results here (default: a temporary folder)")
    parser.add_argument("--output", help="append the report to this Markdown file")
    parser.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)  # the test suite's run
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        Path(args.child).with_suffix(".result.json").write_text(json.dumps(check_one(spec)))
        return 0
    import torch

    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("error: gpu_check needs a CUDA GPU and none is available here (torch.cuda.is_available() is False). "
              "On this machine run the CPU benchmark instead: python benchmarks/bench_vs_trl.py --preset cpu",
              file=sys.stderr)
        return 2
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(names) - set(MODELS)
    if unknown:
        parser.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODELS)}")
    cuda = not args.cpu_dry_run
    precisions = ["fp32"]
    if cuda:  # native bf16 only: compute capability >= 8.0 (torch.cuda.is_bf16_supported also counts emulation)
        precisions = (["bf16"] if torch.cuda.get_device_capability() >= (8, 0) else []) + ["fp16"]
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        results, notes = [], []
        for name in names if cuda else ["dry-run"]:
            preset = MODELS[name] if cuda else DRY_RUN
            print(f"building {name} ({preset.note}) ...", flush=True)
            model_dir = build(preset, root / f"model_{name}")
            data = root / f"data_{name}.jsonl"
            rows = make_rows(preset, max(args.steps, 1) * preset.batch_size)
            data.write_text("".join(json.dumps(r) + "\n" for r in rows))
            for precision in precisions:
                print(f"  {precision} ...", flush=True)
                spec = {"name": name, "precision": precision, "model_dir": str(model_dir), "data": str(data),
                        "device": "cuda" if cuda else "cpu", "steps": args.steps, "batch_size": preset.batch_size,
                        "max_length": preset.max_length, "max_prompt_length": preset.max_prompt_length}
                results.append(run_child(spec, root))
            if cuda and not args.no_fsdp and name == names[0]:
                print("  FSDP ...", flush=True)
                notes.append(run_fsdp(model_dir, data, precisions[0], root))
        if cuda and not args.no_trl:
            notes.append(trl_comparison(root, args.steps))
        if not cuda:
            shutil.rmtree(root / "model_dry-run", ignore_errors=True)
    title = (f"### GPU check: {datetime.date.today().isoformat()}, {hardware(cuda)}\n\n"
             f"Random-weight models of real shapes, 4-bit NF4 base, LoRA r=16 all-linear, paged 8-bit AdamW, "
             f"{args.steps} KTO steps per row. {versions()}.")
    report = "\n".join([title, "", *table(results), "", *notes])
    print("\n" + report)
    if args.output:
        with open(args.output, "a") as f:
            f.write("\n" + report + "\n")
    ok = all("error" not in r and r["finite"] for r in results) and not any("FAILED" in n for n in notes)
    return 0 if ok else 1


def trl_comparison(root: Path, steps: int) -> str:
    """bench_vs_trl.py on the qwen2.5-0.5b preset (its table), when TRL is installed."""
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        return "- TRL: not installed here (carry its wheel to compare; see benchmarks/README.md)."
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_vs_trl.py"), "--preset", "qwen2.5-0.5b",
                           "--steps", str(max(2, steps // 2)), "--sides", "kto_pieces,trl,trl_precompute,sft_head",
                           "--workdir", str(root / "vs_trl")], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        return "- TRL comparison FAILED: " + " / ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    return proc.stdout[proc.stdout.index("### "):].strip()


if __name__ == "__main__":
    sys.exit(main())
