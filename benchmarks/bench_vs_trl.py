"""kto_lite against TRL's KTOTrainer on the same model, data, LoRA and schedule: speed, memory, KTO/SFT.

    python benchmarks/bench_vs_trl.py --preset cpu [--steps N] [--batch-size B] [--grad-accum G]
                                      [--max-length T] [--no-4bit] [--repeat R] [--output FILE.md]
                                      [--sides kto_lite,trl,...] [--workdir DIR]

One invocation builds a random-weight model of the preset's shape (a config, random weights and a
word-level tokenizer, saved to a temporary folder: nothing is downloaded) and a synthetic data set
(prompt/completion/label rows, log-normal prompt and completion lengths, both labels), then trains
on them once per side, each side in its own subprocess so that peak memories never mix:

- kto_lite:       `kto_lite.train.train(TrainConfig(...))`, fresh $KTO_LITE_CACHE (so the one-off
                  reference precompute is paid and counted);
- trl:            TRL `KTOTrainer` with a `peft_config` and its defaults (reference = adapters off,
                  computed on every step);
- trl_precompute: the same with `precompute_ref_log_probs=True`;
- sft:            a plain supervised loop on the same batches: LoRA on the same base, `model(...,
                  labels=...)` (transformers' causal-LM loss over completion tokens), backward, step;
- sft_head:       the same loop with kto_lite's completion-only chunked log-prob head instead of
                  full logits (the same machinery as kto_lite: isolates what KTO itself adds).

Same on every side: base model loaded by `kto_lite.model.load_base` (4-bit NF4 + double quantization,
compute dtype bf16 on GPU / fp32 on CPU; or unquantized with --no-4bit), LoRA r/alpha on all linear
layers, dropout 0, gradient checkpointing (non-reentrant), AdamW (torch), lr, linear schedule without
warmup, grad clipping 1.0, batch size, gradient accumulation, max_length, number of optimizer steps;
bitsandbytes' CPU weight repacking is switched off on every side (it corrupts gradients, see
`watch_bnb_cpu_repack`; --allow-bnb-cpu-repack to see what happens without).
The data set holds exactly steps x batch x accumulation rows: every side trains one epoch, and a
precompute pass covers exactly the rows that are trained on.

What is timed (wall clock, `time.perf_counter`), model loading and tokenization excluded on every side:
- kto_lite: from entering `Trainer.fit` (model loaded, data tokenized; the reference pass comes first)
  to the end of the last optimizer step. Excludes the final adapter/checkpoint save.
- trl: from calling `trainer.train()` (optimizer creation, dataloader) to the end of the last step.
- trl_precompute: the same plus the duration of `KTOTrainer._precompute_ref_logps` (run in __init__).
- sft, sft_head: from the first micro-batch to the end of the last optimizer step.
Process CPU time (all threads) is measured over the same spans. With --repeat R the sides run R times
round-robin and each side's fastest run is reported (the one least slowed down by other processes).
tokens/s = non-padding prompt+completion tokens of the training examples processed (truncated to
max_length; KL rows not counted) / that time, the same definition for every side.
Peak memory: on CPU the process's peak resident set size (getrusage ru_maxrss), with the high-water
mark reset (/proc/self/clear_refs) once the model is loaded, so it is the peak *during training*
(the weights included); the loading peak, which is the same for every side, is reported apart. On
GPU `torch.cuda.max_memory_allocated`, reset at the same points.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIDES = ("kto_lite", "trl", "trl_precompute", "sft", "sft_head")
LABELS = {
    "kto_lite": "kto_lite",
    "trl": "TRL KTOTrainer (defaults)",
    "trl_precompute": "TRL, precompute_ref_log_probs",
    "sft": "SFT step (HF causal-LM loss)",
    "sft_head": "SFT step (kto_lite log-prob head)",
}
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


@dataclass(frozen=True)
class Preset:
    arch: str  # "llama" or "qwen2"
    shape: dict  # config fields: hidden_size, layers, heads, vocab_size, ...
    device: str  # "cpu" or "cuda"
    steps: int
    batch_size: int
    gradient_accumulation_steps: int
    max_length: int
    max_prompt_length: int
    prompt_tokens: tuple[float, float]  # log-normal (median, sigma) of prompt lengths in tokens
    completion_tokens: tuple[float, float]  # same for completions (cut at max_length when longer)
    lora_r: int = 16
    lora_alpha: int = 32
    learning_rate: float = 5e-5
    seed: int = 0
    note: str = ""
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # A few seconds a side: for the test suite (tests/test_bench.py).
    "smoke": Preset("llama", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2),
                    "cpu", steps=2, batch_size=2, gradient_accumulation_steps=1, max_length=64,
                    max_prompt_length=32, prompt_tokens=(10, 0.5), completion_tokens=(14, 0.6), lora_r=8,
                    lora_alpha=16, note="tiny random Llama, for the test suite"),
    # A few minutes on 2 CPU cores: a Llama-style model with a real 32k vocabulary and a small body,
    # so the output head weighs what it does in a real model (it dominates the FLOPs here).
    "cpu": Preset("llama", dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2),
                  "cpu", steps=4, batch_size=4, gradient_accumulation_steps=2, max_length=512,
                  max_prompt_length=256, prompt_tokens=(40, 0.7), completion_tokens=(80, 0.8),
                  note="random Llama, vocab 32k, hidden 256, 4 layers"),
    # Real shapes (config.json of the Hub models), random weights: GPU only.
    "qwen2.5-0.5b": Preset("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                         tie_word_embeddings=True, rope_theta=1000000.0,
                                         max_position_embeddings=32768),
                           "cuda", steps=10, batch_size=8, gradient_accumulation_steps=2, max_length=1024,
                           max_prompt_length=512, prompt_tokens=(160, 0.8), completion_tokens=(220, 0.8),
                           note="Qwen2.5-0.5B shape, random weights"),
    "llama-3.1-8b": Preset("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                         head_dim=128, tie_word_embeddings=False, rope_theta=500000.0,
                                         max_position_embeddings=131072),
                           "cuda", steps=5, batch_size=4, gradient_accumulation_steps=4, max_length=1024,
                           max_prompt_length=512, prompt_tokens=(160, 0.8), completion_tokens=(220, 0.8),
                           learning_rate=2e-5, note="Llama-3.1-8B shape, random weights"),
}


# ============================================================================ model and data
def build_tokenizer(vocab_size: int):
    """Word-level tokenizer: tokens "w0".."wN" split on spaces, so a row of k words is k tokens; BOS added."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + [f"w{i}" for i in range(vocab_size - len(SPECIALS))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def model_config(preset: Preset):
    """(model class, config) of the preset; token ids as `build_tokenizer` numbers them."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        preset.arch]
    ids = {f"{name}_token_id": SPECIALS.index(tok) for name, tok in (("pad", "<pad>"), ("bos", "<s>"), ("eos", "</s>"))}
    return model_cls, config_cls(**{"max_position_embeddings": 4096, **preset.shape}, **ids)


def build_model(preset: Preset, path: Path) -> Path:
    """Random weights of the preset's shape + tokenizer, saved to `path` (reused when already there)."""
    if (path / "config.json").is_file():
        return path
    import torch

    tokenizer = build_tokenizer(preset.shape["vocab_size"])
    model_cls, config = model_config(preset)
    torch.manual_seed(preset.seed)
    device = "cuda" if preset.device == "cuda" else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # a 8B model in fp32 would not fit
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    return path


def lognormal_lengths(n: int, median: float, sigma: float, low: int, high: int, rng: random.Random) -> list[int]:
    return [min(high, max(low, round(median * math.exp(rng.gauss(0, sigma))))) for _ in range(n)]


def make_rows(preset: Preset, n: int) -> list[dict]:
    """n rows with log-normal prompt/completion lengths (in tokens) and both labels, ~55% desirable.

    Prompts stay within max_prompt_length (BOS included) so that both sides truncate the same way:
    only completions longer than max_length - prompt lose their tail, as in both trainers.
    """
    rng = random.Random(preset.seed)
    words = preset.shape["vocab_size"] - len(SPECIALS)
    prompt_lengths = lognormal_lengths(n, *preset.prompt_tokens, 1, preset.max_prompt_length - 1, rng)
    completion_lengths = lognormal_lengths(n, *preset.completion_tokens, 1, 2 * preset.max_length, rng)
    labels = [rng.random() < 0.55 for _ in range(n - 2)] + [True, False]  # both labels, whatever n
    rng.shuffle(labels)

    def text(k):
        return " ".join(f"w{rng.randrange(words)}" for _ in range(k))

    # the completion starts with a space: prompt + completion is the whole text on both sides
    return [{"prompt": text(p), "completion": " " + text(c), "label": lab}
            for p, c, lab in zip(prompt_lengths, completion_lengths, labels)]


# ============================================================================ measuring in a child
class Memory:
    """Peak memory since the last reset: RSS on CPU (ru_maxrss), torch.cuda.max_memory_allocated on GPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.loading_mb = None  # peak before the reset: model loading
        self.start_mb = 0.0  # memory in use at the reset: weights (+ libraries on CPU)

    def peak_mb(self) -> float:
        if self.cuda:
            import torch

            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def reset(self) -> None:
        """Record the peak so far (model loading) and restart the high-water mark from now."""
        self.loading_mb = self.peak_mb()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_mb = torch.cuda.memory_allocated() / 2**20
            return
        try:  # "5" resets the peak RSS of this process to its current RSS (Linux >= 4.0)
            found = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
            self.start_mb = int(found.group(1)) / 1024 if found else 0.0
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.loading_mb = None  # cannot reset: the peak includes model loading


class Clock:
    """Wall and process-CPU time of the timed region and of its reference-precompute part; tokens processed.

    CPU time (all threads of the process) is reported next to wall time because on a shared machine
    it depends much less on what the other processes do.
    """

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.start = self.first_step = self.end = None  # (wall, cpu) pairs
        self.precompute = [0.0, 0.0]  # spent outside [start, end] (TRL precomputes in __init__)
        self.tokens = 0
        self.steps = 0

    def now(self) -> tuple[float, float]:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def mark_start(self) -> None:
        self.start = self.now()

    def add_precompute(self, since: tuple[float, float]) -> None:
        now = self.now()
        self.precompute = [p + n - s for p, n, s in zip(self.precompute, now, since)]

    def step_begin(self) -> None:
        if self.first_step is None:
            self.first_step = self.now()

    def step_end(self) -> None:
        self.end = self.now()
        self.steps += 1

    def result(self) -> dict:
        out = {"steps": self.steps, "tokens": self.tokens}
        for i, prefix in enumerate(("", "cpu_")):
            out[f"{prefix}seconds"] = self.end[i] - self.start[i] + self.precompute[i]
            out[f"{prefix}step_seconds"] = self.end[i] - self.first_step[i]  # the optimizer steps alone
            out[f"{prefix}setup_seconds"] = self.first_step[i] - self.start[i] + self.precompute[i]  # reference pass
        return out


def child(side: str, spec_path: Path) -> None:
    """Run one side, write its result JSON next to the spec."""
    spec = json.loads(spec_path.read_text())
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cuda = spec["device"] == "cuda"
    memory, clock = Memory(cuda), Clock(cuda)
    repacks = watch_bnb_cpu_repack(allow=spec["bnb_cpu_repack"])
    runner = {"kto_lite": run_kto_lite, "trl": run_trl, "trl_precompute": run_trl, "sft": run_sft,
              "sft_head": run_sft}[side]
    extra = runner(side, spec, memory, clock)
    result = {"side": side, **clock.result(), "peak_mb": memory.peak_mb(), "loading_peak_mb": memory.loading_mb,
              "start_mb": memory.start_mb, "bnb_cpu_repacks": repacks[0],
              "torch_threads": torch.get_num_threads(), **extra}
    (spec_path.parent / f"result_{side}.json").write_text(json.dumps(result))


def watch_bnb_cpu_repack(allow: bool) -> list[int]:
    """Count bitsandbytes' CPU weight repacks; with allow=False, switch them off on every loaded model.

    bitsandbytes >= 0.49 on a CPU with AVX512-BF16 repacks a Linear4bit weight for its CPU inference
    kernel the first time the layer runs in eval mode without grad (e.g. a reference pass with
    `model.eval()`). From then on every forward, training ones included, goes through
    `bitsandbytes::gemv_4bit`, which has no autograd formula: backward silently drops the gradient
    through the frozen 4-bit matmuls (PyTorch warns "an autograd kernel was not registered"). The
    gradients of the LoRA weights below the top layer are then wrong, and backward does less work.
    allow=False does what a trainer should do (and kto_lite's add_lora does): set
    `support_avx512bf16_for_cpu = False` on each Linear4bit, here on every side, right after loading.
    TRL needs it with precompute_ref_log_probs=True: it precomputes in __init__, while the freshly
    loaded model is still in eval mode, which triggers the repack.
    """
    count = [0]
    try:
        import bitsandbytes.nn.modules as bnb_modules
    except ImportError:
        return count
    convert = getattr(bnb_modules, "_convert_weight_packed_for_cpu", None)
    if convert is not None:
        def counted(*a, **kw):
            count[0] += 1
            return convert(*a, **kw)

        bnb_modules._convert_weight_packed_for_cpu = counted
    if not allow:
        import kto_lite.model
        import kto_lite.train

        load_base = kto_lite.model.load_base

        def load_base_without_repack(*a, **kw):
            model = load_base(*a, **kw)
            kto_lite.model.keep_4bit_layout_trainable(model)
            return model

        kto_lite.model.load_base = kto_lite.train.load_base = load_base_without_repack
    return count


def _train_config(spec: dict, **kw):
    from kto_lite.config import TrainConfig

    values = dict(model=spec["model_dir"], data=spec["data"], load_in_4bit=spec["load_in_4bit"],
                  lora_r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                  lora_target_modules="all-linear", gradient_checkpointing=True, use_chat_template=False,
                  learning_rate=spec["learning_rate"], lr_scheduler_type="linear", warmup_ratio=0.0,
                  max_grad_norm=1.0, optimizer="adamw_torch", batch_size=spec["batch_size"],
                  gradient_accumulation_steps=spec["gradient_accumulation_steps"], max_length=spec["max_length"],
                  max_prompt_length=spec["max_prompt_length"], max_steps=spec["steps"], seed=spec["seed"],
                  logging_steps=1, save_steps=0)
    values.update(kw)
    return TrainConfig(**values)


def run_kto_lite(side: str, spec: dict, memory: Memory, clock: Clock) -> dict:
    cache = Path(spec["workdir"]) / "kto_lite_cache"
    shutil.rmtree(cache, ignore_errors=True)  # fresh: the reference precompute is part of the run
    os.environ["KTO_LITE_CACHE"] = str(cache)
    from kto_lite import train as kto_train
    from kto_lite.run_dir import read_metrics

    fit, train_step = kto_train.Trainer.fit, kto_train.Trainer.train_step

    def timed_fit(self, resume_from):  # model loaded, data tokenized: training (reference pass first) starts
        memory.reset()
        clock.mark_start()
        return fit(self, resume_from)

    def timed_step(self, step, meter):
        clock.step_begin()
        before = meter.tokens
        out = train_step(self, step, meter)
        clock.tokens += meter.tokens - before  # non-pad tokens of this step's examples
        clock.step_end()
        return out

    kto_train.Trainer.fit, kto_train.Trainer.train_step = timed_fit, timed_step
    out_dir = Path(spec["workdir"]) / "out_kto_lite"
    shutil.rmtree(out_dir, ignore_errors=True)
    kto_train.train(_train_config(spec, output_dir=str(out_dir)), show_progress=False)
    return {"losses": [row["loss"] for row in read_metrics(out_dir)]}


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
        gradient_accumulation_steps=spec["gradient_accumulation_steps"], max_steps=spec["steps"],
        max_length=spec["max_length"], learning_rate=spec["learning_rate"], lr_scheduler_type="linear",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", seed=spec["seed"],
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        precompute_ref_log_probs=side == "trl_precompute")
    peft_config = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                             target_modules="all-linear", task_type="CAUSAL_LM")

    precompute = KTOTrainer._precompute_ref_logps

    def timed_precompute(self, *a, **kw):
        start = clock.now()
        out = precompute(self, *a, **kw)
        clock.add_precompute(start)
        return out

    KTOTrainer._precompute_ref_logps = timed_precompute

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock.step_begin()

        def on_step_end(self, args, state, control, **kw):
            clock.step_end()

    trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Steps()])
    clock.mark_start()
    trainer.train()
    clock.tokens = int(trainer._total_train_tokens)  # attention_mask sums of the batches: non-pad tokens
    return {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def run_sft(side: str, spec: dict, memory: Memory, clock: Clock) -> dict:
    """Supervised fine-tuning on the same examples, in kto_lite's length-grouped batches, same LoRA and optimizer."""
    import torch

    from kto_lite.batching import collate, epoch_batches
    from kto_lite.data import load_data, tokenize
    from kto_lite.logps import completion_logps
    from kto_lite.model import add_lora, compute_dtype, load_base, load_tokenizer

    config = _train_config(spec, output_dir=str(Path(spec["workdir"]) / "out_sft"))
    tokenizer = load_tokenizer(config.model)
    examples = tokenize(load_data(config.data)[0], tokenizer, max_length=config.max_length,
                        max_prompt_length=config.max_prompt_length, use_chat_template=False)
    torch.manual_seed(config.seed)
    model = add_lora(load_base(config.model, load_in_4bit=config.load_in_4bit), config)
    memory.reset()
    clock.mark_start()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    batches = epoch_batches([len(e.prompt_ids) + len(e.completion_ids) for e in examples],
                            [e.label for e in examples], config.batch_size, seed=config.seed, epoch=0)
    device = next(model.parameters()).device
    dtype = compute_dtype()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    model.train()
    losses = []
    gas = config.gradient_accumulation_steps
    for step in range(config.max_steps):
        clock.step_begin()
        step_loss = 0.0
        for micro in range(gas):
            idx = batches[(step * gas + micro) % len(batches)]
            b = {k: v.to(device) for k, v in collate([examples[i].prompt_ids for i in idx],
                                                     [examples[i].completion_ids for i in idx],
                                                     tokenizer.pad_token_id).items()}
            with autocast:
                if side == "sft":  # what a plain SFT loop does: full (B, T, V) logits, transformers' loss
                    labels = b["input_ids"].masked_fill(b["completion_mask"] == 0, -100)
                    loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss
                else:  # kto_lite's head: only completion positions, in chunks
                    loss = -completion_logps(model, **b).sum() / b["completion_mask"].sum()
            (loss / gas).backward()
            step_loss += float(loss) / gas
            clock.tokens += int(b["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        clock.step_end()
    return {"losses": losses}


# ============================================================================ the parent: run, compare, print
def hardware(cuda: bool) -> str:
    if cuda:
        import torch

        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    model = platform.processor() or "unknown CPU"
    try:
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate"):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} -")
    return ", ".join(out)


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


def secs(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def format_results(results: dict[str, dict], spec: dict, title: str) -> str:
    base = results.get("trl")
    gpu = spec["device"] == "cuda"
    mem = "peak GPU mem (MiB)" if gpu else "peak RSS (MiB)"
    cpu_cols = "" if gpu else " CPU time (s) |"
    cpu_ratio = "" if gpu else " tokens/CPU-s vs TRL |"
    lines = [title, "",
             f"| run | time (s) |{cpu_cols} of which ref. precompute (s) | tokens/s | vs TRL default |{cpu_ratio} "
             f"{mem} | vs TRL default | added by training (MiB) | step-1 loss |",
             "|---|" + "---:|" * (8 if gpu else 10)]
    for side, r in results.items():
        tps = r["tokens"] / r["seconds"]
        precompute = secs(r["setup_seconds"]) if side in ("kto_lite", "trl_precompute") else "-"
        loss = f"{r['losses'][0]:.4f}" if r["losses"] and side.startswith(("kto", "trl")) else "-"
        cpu = "" if gpu else f" {secs(r['cpu_seconds'])} |"
        cpu_vs = "" if gpu else f" {ratio(base and base['cpu_seconds'], r['cpu_seconds'])} |"
        lines.append(f"| {LABELS[side]} | {secs(r['seconds'])} |{cpu} {precompute} | {tps:,.0f} | "
                     f"{ratio(tps, base and base['tokens'] / base['seconds'])} |{cpu_vs} {r['peak_mb']:,.0f} | "
                     f"{ratio(r['peak_mb'], base and base['peak_mb'])} | {r['peak_mb'] - r['start_mb']:,.0f} | "
                     f"{loss} |")
    lines.append("")
    tokens = ", ".join(f"{side} {r['tokens']:,}" for side, r in results.items())
    lines.append(f"Tokens per run: {tokens} "
                 f"({spec['examples']} examples, {spec['steps']} steps of {spec['batch_size']} x "
                 f"{spec['gradient_accumulation_steps']}).")
    if any(len(r.get("all_seconds", [])) > 1 for r in results.values()):
        times = "; ".join(f"{side} " + ", ".join(f"{t:.1f}" for t in r["all_seconds"]) for side, r in results.items())
        lines.append(f"Wall times of every round (s), the fastest reported above: {times}.")
    loading = [r["loading_peak_mb"] for r in results.values() if r.get("loading_peak_mb")]
    if loading:
        lines.append(f"Peak memory while loading the model (before training, excluded above): "
                     f"{min(loading):,.0f}-{max(loading):,.0f} MiB.")
    repacked = [s for s, r in results.items() if r.get("bnb_cpu_repacks")]
    if repacked:
        lines.append(f"WARNING: bitsandbytes repacked 4-bit weights for its CPU inference kernel in: "
                     f"{', '.join(repacked)}. Backward then skips the frozen 4-bit matmuls (no autograd for "
                     "gemv_4bit): wrong LoRA gradients and less work than the other sides (--allow-bnb-cpu-repack "
                     "was given, or a side switches it back on).")
    kto, sft, head = results.get("kto_lite"), results.get("sft"), results.get("sft_head")
    for name, ref in (("SFT (HF loss)", sft), ("SFT (same log-prob head)", head)):
        if kto and ref:
            parts = []
            for prefix, unit in (("", "wall"), ("cpu_", "CPU")) if not gpu else (("", "wall"),):
                per_step = ref[f"{prefix}step_seconds"] / ref["steps"]
                parts.append(f"{unit}: kto_lite {kto[f'{prefix}step_seconds'] / kto['steps'] / per_step:.2f}x steps "
                             f"only, {kto[f'{prefix}seconds'] / kto['steps'] / per_step:.2f}x with the reference "
                             f"precompute amortised over this one epoch, TRL default "
                             f"{ratio(base and base[f'{prefix}seconds'] / base['steps'], per_step)}")
            lines.append(f"KTO/{name} time per optimizer step: " + "; ".join(parts) + ".")
    losses = {s: r["losses"][0] for s, r in results.items() if s.startswith(("kto", "trl")) and r["losses"]}
    if losses:
        lines.append("Step-1 losses (policy == reference, so 0.5 expected on each side): "
                     + ", ".join(f"{s} {v:.6f}" for s, v in losses.items()) + ".")
    if kto and base:
        checks = [("throughput >= 2x TRL default", (kto["tokens"] / kto["seconds"]) / (base["tokens"] / base["seconds"]) >= 2),
                  ("peak memory <= 0.6x TRL default", kto["peak_mb"] / base["peak_mb"] <= 0.6)]
        if sft:
            checks.append(("KTO step within 2x of an SFT step (steps only)",
                           kto["step_seconds"] / kto["steps"] <= 2 * sft["step_seconds"] / sft["steps"]))
        lines.append("Targets (wall time): " + "; ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in checks) + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    parser.add_argument("--batch-size", type=int, help="examples per micro-batch (default: the preset's)")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default: the preset's)")
    parser.add_argument("--max-length", type=int, help="longest prompt+completion in tokens (default: the preset's)")
    parser.add_argument("--no-4bit", action="store_true", help="unquantized base on every side (default: 4-bit NF4)")
    parser.add_argument("--allow-bnb-cpu-repack", action="store_true",
                        help="let bitsandbytes repack 4-bit weights for its CPU inference kernel (off by default on "
                             "every side: it corrupts gradients, see watch_bnb_cpu_repack)")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    parser.add_argument("--threads", type=int,
                        help="CPU threads per side (torch and OpenMP); default 1 for CPU presets, so that a run "
                             "on a shared machine neither hogs it nor suffers from thread convoys; 0: torch's default")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every side this many times (round-robin) and report each side's fastest run")
    parser.add_argument("--output", help="append the table (with date, hardware, versions) to this Markdown file")
    parser.add_argument("--workdir", help="keep the model, data, logs and results here (default: a temporary folder)")
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return 0

    preset = PRESETS[args.preset]
    preset = replace(preset, steps=args.steps or preset.steps, batch_size=args.batch_size or preset.batch_size,
                     gradient_accumulation_steps=args.grad_accum or preset.gradient_accumulation_steps,
                     max_length=args.max_length or preset.max_length)
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
        print(f"building the {args.preset} model ({preset.note}) in {model_dir} ...", flush=True)
        build_model(preset, model_dir)
        n = preset.steps * preset.batch_size * preset.gradient_accumulation_steps  # exactly one epoch
        data = root / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(preset, n)))
        spec = {**asdict(preset), "model_dir": str(model_dir), "data": str(data), "workdir": str(root),
                "threads": args.threads if args.threads is not None else int(preset.device == "cpu"),
                "load_in_4bit": not args.no_4bit, "bnb_cpu_repack": args.allow_bnb_cpu_repack, "examples": n}
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
    title = (f"### {args.preset}: {datetime.date.today().isoformat()}, {hardware(cuda)}{load}\n\n"
             f"{preset.note}; {'4-bit NF4' if not args.no_4bit else 'unquantized'} base, LoRA r={preset.lora_r} "
             f"alpha={preset.lora_alpha} all-linear, batch {preset.batch_size} x {preset.gradient_accumulation_steps} "
             f"accumulation, max_length {preset.max_length}, {preset.steps} steps, {threads} CPU thread(s) per side"
             f"{f', fastest of {args.repeat} rounds' if args.repeat > 1 else ''}. {versions()}.")
    table = format_results(results, spec, title)
    print("\n" + table)
    if args.output:
        with open(args.output, "a") as f:
            f.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
