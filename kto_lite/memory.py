"""Predict the peak GPU memory of a kto_lite run from the model's config.json alone.

No weights are downloaded and nothing is allocated: the estimate is arithmetic on the model's shape
(hidden size, layers, heads, vocabulary) and the TrainConfig. Formulas, sources and the CPU
validation are in docs/memory.md; tests/test_memory.py holds them to measurements on tiny models.

The breakdown follows what one training step holds at its peak:
- static: weights (4-bit NF4 linear layers + embeddings/head in the compute dtype), fp32 LoRA
  weights, their fp32 gradients (kept across gradient accumulation), optimizer state, and a fixed
  overhead (CUDA context + allocator, plus one dequantized weight matrix as bitsandbytes' buffer);
- activations saved for backward by the policy forward (one hidden state per layer with gradient
  checkpointing, every layer's saved tensors without);
- one transient on top, the largest of: one layer's recompute + gradients in backward, the log-prob
  head's (1024 x vocab) fp32 chunk, the no-grad KL forward, the no-grad reference forward.
The predicted peak is the larger of that step's and the reference precompute's before training.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kto_lite.config import TrainConfig, resolve_optimizer
from kto_lite.demo import DEMO_MODEL_DIR
from kto_lite.errors import ConfigError, MemoryEstimateError
from kto_lite.files import GIB, MIB, format_bytes
from kto_lite.gguf_input import converted_config, gguf_source
from kto_lite.training.head import bytes_per_logit, chunk_rows  # the output head's (rows, vocab) chunks
from kto_lite.training.reference import (
    REFERENCE_BATCH_MULTIPLIER,  # reference precompute batch = this x batch_size
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

CUDA_OVERHEAD_BYTES = 500 * MIB  # CUDA context (~300-400 MiB) + caching-allocator slack; not in max_memory_allocated
BNB_BLOCKSIZE = 64  # NF4 block size: one absmax per 64 weights
BNB_NESTED_BLOCKSIZE = 256  # double quantization: absmax are quantized to 8 bit in blocks of 256
BNB_OPTIM_MIN_8BIT_SIZE = 4096  # bitsandbytes 8-bit optimizers keep tensors smaller than this in fp32
BNB_OPTIM_BLOCKSIZE = 256  # blockwise 8-bit state: one fp32 absmax per 256 values, per state

# config.json subsets of the models the recipes use, so `estimate` works before anything is
# downloaded. Values are copied from each model's config.json on the Hugging Face Hub.
KNOWN_MODELS: dict[str, dict] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(model_type="llama", hidden_size=576, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152,
        tie_word_embeddings=True),
    "Qwen/Qwen2.5-0.5B-Instruct": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
        tie_word_embeddings=True),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
        tie_word_embeddings=True),
    "Qwen/Qwen2.5-7B-Instruct": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
        tie_word_embeddings=False),
    "Qwen/Qwen2.5-32B-Instruct": dict(model_type="qwen2", hidden_size=5120, num_hidden_layers=64,
        num_attention_heads=40, num_key_value_heads=8, intermediate_size=27648, vocab_size=152064,
        tie_word_embeddings=False),
    "meta-llama/Llama-3.2-1B-Instruct": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, intermediate_size=8192,
        vocab_size=128256, tie_word_embeddings=True),
    "meta-llama/Llama-3.2-3B-Instruct": dict(model_type="llama", hidden_size=3072, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, intermediate_size=8192,
        vocab_size=128256, tie_word_embeddings=True),
    "meta-llama/Llama-3.1-8B-Instruct": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=14336,
        vocab_size=128256, tie_word_embeddings=False),
    "meta-llama/Llama-3.1-70B-Instruct": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, head_dim=128, intermediate_size=28672,
        vocab_size=128256, tie_word_embeddings=False),
    "mistralai/Mistral-7B-Instruct-v0.3": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=14336,
        vocab_size=32768, tie_word_embeddings=False),
    "google/gemma-2-2b-it": dict(model_type="gemma2", hidden_size=2304, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, intermediate_size=9216,
        vocab_size=256000, tie_word_embeddings=True, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0),
}


@dataclass(frozen=True)
class GPU:
    vram_gib: float  # memory a training process can use (what torch.cuda.mem_get_info reports free)
    bf16: bool  # compute capability >= 8.0; otherwise kto_lite computes in fp16
    tflops: float  # assumed sustained TFLOP/s for QLoRA training: a rough figure, for time estimates only


# Matched by substring of torch.cuda.get_device_name() (case-insensitive), first match wins: longer
# names first ("RTX 4060 Ti" before "RTX 4060", "A100" before "A10").
GPUS: dict[str, GPU] = {
    "T4": GPU(14.7, False, 10),
    "V100": GPU(15.5, False, 25),
    "RTX 3060 Ti": GPU(7.6, True, 12),
    "RTX 3060": GPU(11.6, True, 10),
    "RTX 3070": GPU(7.6, True, 15),
    "RTX 3080": GPU(9.6, True, 22),
    "RTX 3090": GPU(23.6, True, 25),
    "RTX 4060 Ti": GPU(15.6, True, 14),  # the 16 GB model
    "RTX 4060": GPU(7.6, True, 12),
    "RTX 4070": GPU(11.6, True, 20),
    "RTX 4080": GPU(15.6, True, 35),
    "RTX 4090": GPU(23.6, True, 50),
    "A100": GPU(79.0, True, 90),  # the 80 GB model
    "H100": GPU(79.0, True, 200),
    "A10": GPU(22.0, True, 30),
    "L4": GPU(22.0, True, 25),
}


def find_gpu(gpu_name: str | None) -> GPU | None:
    for key, gpu in GPUS.items():
        if gpu_name and key.lower() in gpu_name.lower():
            return gpu
    return None


# ---------------------------------------------------------------------- the model's shape
@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from config.json (Llama-style decoder: Llama, Mistral, Qwen2, Gemma-2)."""

    model_type: str
    hidden: int  # H
    layers: int  # L
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # F (MLP width)
    vocab: int  # V
    tied: bool  # lm_head shares the embedding matrix
    qkv_bias: bool
    norms_per_layer: int  # RMSNorms per decoder layer: 2 (Llama), 4 (Gemma-2)
    eager_attention: bool  # attention-logit soft-capping (Gemma-2) rules out SDPA: (T x T) scores are stored
    logit_softcap: bool  # final-logit soft-capping adds one more (rows, V) fp32 buffer in the head

    @classmethod
    def from_config(cls, cfg: dict) -> ModelShape:
        cfg = cfg.get("text_config") or cfg
        if cfg.get("num_local_experts") or cfg.get("num_experts"):
            raise MemoryEstimateError("mixture-of-experts models are not modelled by the estimator")
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size", "vocab_size") if not cfg.get(k)]
        if missing:
            raise MemoryEstimateError(f"model config has no {', '.join(missing)}: not a decoder-only LM config.json?")
        model_type = cfg.get("model_type", "")
        heads = cfg["num_attention_heads"]
        tied = cfg.get("tie_word_embeddings")
        return cls(
            model_type=model_type,
            hidden=cfg["hidden_size"],
            layers=cfg["num_hidden_layers"],
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate=cfg["intermediate_size"],
            vocab=cfg["vocab_size"],
            tied=model_type.startswith("gemma") if tied is None else bool(tied),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias")),
            norms_per_layer=4 if model_type in ("gemma2", "gemma3_text") else 2,
            eager_attention=cfg.get("attn_logit_softcapping") is not None,
            logit_softcap=cfg.get("final_logit_softcapping") is not None,
        )

    def num_params(self) -> int:
        """All parameters, as the model card counts them (embeddings once when tied)."""
        linear = sum(i * o for _, i, o in self.linears())
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        per_layer = linear + bias + self.norms_per_layer * self.hidden
        return self.layers * per_layer + (1 if self.tied else 2) * self.vocab * self.hidden + self.hidden

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of one decoder layer's linear layers."""
        H, A, KV, F = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [("q_proj", H, A), ("k_proj", H, KV), ("v_proj", H, KV), ("o_proj", A, H),
                ("gate_proj", H, F), ("up_proj", H, F), ("down_proj", F, H)]


def _gguf_config(path: Path) -> dict | None:
    """config of a local GGUF model (a .gguf file, or a folder holding one): its converted folder's
    config.json when it was converted already, else read from the file's metadata (no conversion)."""

    try:
        gguf = gguf_source(str(path))
    except ConfigError as e:
        raise MemoryEstimateError(str(e)) from e
    if gguf is None:
        return None
    converted = converted_config(gguf)
    if converted is not None:
        return converted
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).to_dict()


def load_model_config(model: str | None) -> dict:
    """config.json of `model` (local folder, Hub cache, or the built-in table) without downloading."""
    if model is None:
        model = str(DEMO_MODEL_DIR)
    path = Path(model)
    if path.exists():
        config = _gguf_config(path)
        if config is not None:
            return config
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MemoryEstimateError(f"{path} has no config.json")
        return json.loads((path / "config.json").read_text())
    if path.suffix == ".json" and path.is_file():
        return json.loads(path.read_text())
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text())
    except (ImportError, ValueError):  # not a valid repo id: fall through to the table
        pass
    if model in KNOWN_MODELS:
        return dict(KNOWN_MODELS[model])
    raise MemoryEstimateError(
        f"no config.json for {model!r}: it is not a local folder, not in the Hugging Face cache and not "
        f"one of the built-in models ({', '.join(KNOWN_MODELS)}). Download only its config.json "
        f"(`hf download {model} config.json`), or give `estimate` a local folder or config.json "
        f"path as --model."
    )


# ---------------------------------------------------------------------- the estimate
@dataclass
class MemoryEstimate:
    """Predicted peak memory, in bytes: the larger of one training step's peak and the reference precompute's.

    training_peak = weights + LoRA weights + gradients + optimizer state + overhead + activations
    + the largest transient (recompute, logprob_chunks, kl_pass, reference_pass).
    """

    weights: int
    lora_weights: int
    gradients: int
    optimizer_state: int
    activations: int  # saved for backward at the end of the policy forward
    recompute: int  # transient: one layer's recomputed activations + gradients in backward
    logprob_chunks: int  # transient: the log-prob head's fp32 (rows, vocab) buffers
    kl_pass: int  # transient: the no-grad policy forward on the KL (mismatched) batch
    reference_pass: int  # transient: no-grad reference forward; 0 when reference log-probs are precomputed
    overhead: int  # CUDA context + allocator, and one dequantized weight matrix
    fsdp_gathered: int = 0  # FSDP: whole copies of the weights being computed with, on top of this process's shards
    precompute: int = 0  # before training: the no-grad reference pass over the data, in bigger batches
    description: dict = field(default_factory=dict)  # settings the numbers depend on, for format()

    @property
    def transient(self) -> int:
        return max(self.recompute, self.logprob_chunks, self.kl_pass, self.reference_pass)

    @property
    def training_peak(self) -> int:
        static = self.weights + self.fsdp_gathered + self.lora_weights + self.gradients + self.optimizer_state
        return static + self.overhead + self.activations + self.transient

    @property
    def precompute_peak(self) -> int:
        """Reference precompute, before the first step: no activations, gradients or optimizer state yet."""
        return self.weights + self.fsdp_gathered + self.lora_weights + self.overhead + self.precompute

    @property
    def total(self) -> int:
        return max(self.training_peak, self.precompute_peak)

    def fits(self, budget_gb: float) -> bool:
        return self.total <= budget_gb * GIB

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "description"}
        return {**values, "transient": self.transient, "training_peak": self.training_peak,
                "precompute_peak": self.precompute_peak, "total": self.total, **self.description}

    def format(self, budget_gb: float | None = None) -> str:
        d = self.description
        transient = self.transient
        lines = [
            f"Estimated peak memory{' per process' if d['processes'] > 1 else ''}: {d['model']}",
            f"  {d['quantization']}, {d['compute_dtype']} compute, batch {d['batch_size']} x {d['max_length']} "
            f"tokens, gradient checkpointing {'on' if d['gradient_checkpointing'] else 'off'}",
        ]
        sharded = f"; sharded over {d['processes']} processes" if d["processes"] > 1 else ""
        rows = [
            (f"weights ({d['quantization']}; embeddings/head {d['compute_dtype']}{sharded})", self.weights),
            *([("FSDP: 2 decoder layers and the embeddings or head, gathered whole", self.fsdp_gathered)]
              if sharded else []),
            (f"LoRA weights (fp32, r={d['lora_r']}, {d['lora_params']:,} params{sharded and ', sharded'})",
             self.lora_weights),
            ("LoRA gradients (fp32)", self.gradients),
            (f"optimizer state ({d['optimizer']})", self.optimizer_state),
            (f"activations saved for backward ({'checkpointed' if d['gradient_checkpointing'] else 'all layers'})",
             self.activations),
            ("transient, the largest of:", None),
            ("  layer recompute + gradients in backward", self.recompute),
            (f"  log-prob chunks ({d['chunk_rows']} x {d['vocab']} fp32)", self.logprob_chunks),
            ("  KL pass (no grad)", self.kl_pass),
            ("  reference pass (no grad)" + ("; precomputed" if not self.reference_pass else ""),
             self.reference_pass),
            (d["overhead_label"], self.overhead),
        ]
        for label, value in rows:
            if value is None:
                lines.append(f"  {label}")
                continue
            mark = "  <- peak" if label.startswith("  ") and value == transient and transient else ""
            lines.append(f"  {label:<62} {format_bytes(value):>10}{mark}")
        lines.append(f"  {'training step peak':<62} {format_bytes(self.training_peak):>10}")
        if self.precompute:
            label = f"reference precompute before training (batch {d['reference_batch']}, no grad)"
            lines.append(f"  {label:<62} {format_bytes(self.precompute_peak):>10}")
        lines.append(f"  {'total (predicted peak)':<62} {format_bytes(self.total):>10}")
        if budget_gb is not None:
            verdict = "fits" if self.fits(budget_gb) else "does NOT fit"
            lines.append(f"  {verdict} in {budget_gb:g} GiB ({100 * self.total / (budget_gb * GIB):.0f}% used)")
        return "\n".join(lines)


def _quantized_bytes(n: int) -> int:
    """One NF4 weight tensor of n values with double quantization, as bitsandbytes stores it: the packed
    4-bit values and their quantization constants, ~4.127 bits per weight."""
    return (n + 1) // 2 + _quantization_constants_bytes(n)


def _quantization_constants_bytes(n: int) -> int:
    """uint8 absmax per block + fp32 absmax per 256 blocks + NF4 code (16 fp32) + nested code (256 fp32) +
    offset (fp32). Not sharded by FSDP: each process keeps them whole."""
    blocks = math.ceil(n / BNB_BLOCKSIZE)
    nested_blocks = math.ceil(blocks / BNB_NESTED_BLOCKSIZE)
    return blocks + 4 * nested_blocks + 4 * 16 + 4 * 256 + 4


def _adapted(shape: ModelShape, targets: str | list[str]) -> list[tuple[str, int, int]]:
    if targets == "all-linear":
        return shape.linears()
    wanted = {t.rsplit(".", 1)[-1] for t in ([targets] if isinstance(targets, str) else targets)}
    return [lin for lin in shape.linears() if lin[0] in wanted]


def _optimizer(config: TrainConfig, device: str) -> str:
    return resolve_optimizer(config.optimizer, device, config.fsdp)  # the trainer's own 'auto' rule


def _optimizer_bytes(tensor_sizes: list[int], optimizer: str) -> int:
    if optimizer == "adamw_torch":
        return sum(8 * n for n in tensor_sizes)  # exp_avg + exp_avg_sq in fp32
    total = 0
    for n in tensor_sizes:  # bitsandbytes blockwise 8-bit: two uint8 states + fp32 absmax per 256 values
        if n < BNB_OPTIM_MIN_8BIT_SIZE:
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_OPTIM_BLOCKSIZE)
    return total + 2 * 256 * 4  # the two 8-bit quantization maps


def _layer_saved_per_token(shape: ModelShape, config: TrainConfig, seq: int, d: int, *, adapter_input: int,
                           dropout_mask: int) -> float:
    """Bytes one decoder layer saves for backward, per token, with a frozen 4-bit base and LoRA.

    Counted tensor by tensor from what autograd saves (validated on CPU in tests/test_memory.py):
    - each RMSNorm saves its input upcast to fp32 and the fp32 rsqrt: 4H + 4;
    - SDPA attention (flash / memory-efficient kernels) saves q, k, v (k and v repeated to every head
      when the batch is padded), its output and an fp32 logsumexp per head; eager attention (Gemma-2,
      whose logit soft-capping SDPA cannot do) saves q, k, v, the (T x T) scores after tanh, the fp32
      softmax and the probabilities: Korthikanti et al. (2022)'s 5as/h term with an fp32 softmax;
    - the gated MLP (SwiGLU / GeGLU) saves gate, act(gate) and up: 3F;
    - frozen 4-bit matmuls save no activation (bitsandbytes keeps only the packed weight);
    - each LoRA adapter saves its dropped-out input for lora_A's gradient (`adapter_input` bytes per
      value: fp32 when peft casts to the adapter dtype, the compute dtype under autocast), the dropout
      mask, and lora_A's (r,) output for lora_B's gradient.
    """
    H, A, F = shape.hidden, shape.heads * shape.head_dim, shape.intermediate
    norms = shape.norms_per_layer * (4 * H + 4)
    if shape.eager_attention:
        attn = d * 3 * A + shape.heads * seq * (d + 4 + d)
    else:
        attn = d * 4 * A + 4 * shape.heads  # q, k and v repeated to A, output, logsumexp
    mlp = 3 * F * d
    lora, seen_inputs = 0, set()
    for name, in_features, _ in _adapted(shape, config.lora_target_modules):
        lora += adapter_input * config.lora_r
        if config.lora_dropout > 0:  # every adapter draws its own dropout of its input
            lora += (adapter_input + dropout_mask) * in_features
        elif adapter_input == d:  # no cast, no dropout: adapters reading the same input save it once
            group = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(name, name)
            lora += 0 if group in seen_inputs else adapter_input * in_features
            seen_inputs.add(group)
        else:
            lora += adapter_input * in_features  # each adapter makes its own fp32 copy of the input
    return norms + attn + mlp + lora


def _nograd_peak(shape: ModelShape, batch: int, seq: int, d: int, rows: int) -> int:
    """Peak of a no-grad forward (KL / reference pass): one layer's tensors at a time, then the head.

    Inside a layer (measured at the MLP's up_proj): the residual stream, the normed input and two
    more (H,) tensors, and four (F,) ones: act(gate), up's base output, its LoRA update and that
    update scaled (peft adds them out of place); eager attention adds its (T x T) scores. In the head:
    the final and the gathered hidden states, a chunk's fp32 logits (softmax in place) and, in half
    precision, the matmul's output they are converted from.
    """
    tokens = batch * seq
    H, F, V = shape.hidden, shape.intermediate, shape.vocab
    layer = tokens * 4 * d * (H + F)
    if shape.eager_attention:
        layer += batch * shape.heads * seq * seq * (2 * d + 4)
    head = 2 * tokens * H * d + rows * V * bytes_per_logit(half=d == 2, softcap=False)  # no tanh' without grad
    return max(layer, head)


def estimate_memory(config: TrainConfig, model_config: dict | PretrainedConfig | None = None, *,
                    gpu_name: str | None = None, device: str = "cuda", compute_dtype: str | None = None,
                    autocast: bool | None = None, processes: int = 1) -> MemoryEstimate:
    """Peak memory of training `config`, from the model's config.json (dict, PretrainedConfig, or looked up).

    device="cuda" is what train.py does on a GPU: bf16 compute (fp16 when `gpu_name` names a GPU
    without bf16, e.g. "Tesla T4"; the bytes are the same), accelerate's autocast, paged 8-bit AdamW
    for optimizer "auto", and a fixed CUDA overhead. device="cpu" is the CPU run the tests measure:
    fp32, no autocast, AdamW. `compute_dtype` ("float32", "bfloat16", "float16") and `autocast`
    override the device's choice; the tests use them to check the GPU formulas on CPU.

    processes: with `fsdp: true`, the processes (GPUs) of the launch; the estimate is then one process's:
    every weight, LoRA weight, gradient and optimizer state split across them (bitsandbytes' quantization
    constants stay whole in each), plus whole copies of what is being computed with: two decoder layers
    (the one computing and the next, prefetched) and the embeddings or the head (each gathered only while
    it computes; tied ones, one matrix, for the whole step). Activations are each process's own batch.
    """
    config = config.resolved()  # derived fields (max_prompt_length, lora_alpha) from what was set
    if model_config is None:
        model_config = load_model_config(config.model)
    elif not isinstance(model_config, dict):
        model_config = model_config.to_dict()  # a transformers PretrainedConfig
    shape = ModelShape.from_config(model_config)
    gpu = find_gpu(gpu_name)
    if compute_dtype is None:
        compute_dtype = "float32" if device == "cpu" else ("float16" if gpu and not gpu.bf16 else "bfloat16")
    d = 4 if compute_dtype == "float32" else 2
    if autocast is None:
        autocast = device == "cuda" and d == 2  # train.py's Accelerator(mixed_precision=...)
    H, L, V, F = shape.hidden, shape.layers, shape.vocab, shape.intermediate
    B, T = config.batch_size, config.max_length
    if config.share_prompts:  # forced on: a prompt with both completions can exceed max_length (auto never does)
        T = 2 * T - (config.max_prompt_length or T // 2)
    tokens = B * T  # the worst batch: every sequence at max_length

    # --- static: weights, adapters, gradients, optimizer state
    linear_sizes = [i * o for _, i, o in shape.linears()]
    per_linear = _quantized_bytes if config.load_in_4bit else (lambda n: n * d)
    weights = L * sum(per_linear(n) for n in linear_sizes)
    weights += (1 if shape.tied else 2) * V * H * d  # embeddings (+ lm_head): never quantized
    weights += d * (L * shape.norms_per_layer * H + H)  # RMSNorm weights
    if shape.qkv_bias:
        weights += d * L * (shape.heads + 2 * shape.kv_heads) * shape.head_dim
    adapted = _adapted(shape, config.lora_target_modules)
    lora_sizes = L * [n for _, i, o in adapted for n in (config.lora_r * i, config.lora_r * o)]
    lora_weights = 4 * sum(lora_sizes)
    optimizer = _optimizer(config, device)
    optimizer_state = _optimizer_bytes(lora_sizes, optimizer)
    shards = processes if config.fsdp else 1
    fsdp_gathered = 0
    if shards > 1:  # train.shard: each decoder layer one FSDP unit; untied embeddings and head one each
        not_layers = (1 if shape.tied else 2) * V * H * d + d * H  # embeddings, head, final norm
        fsdp_gathered = V * H * d + d * H + 2 * (weights - not_layers) // L
        constants = L * sum(map(_quantization_constants_bytes, linear_sizes)) if config.load_in_4bit else 0
        weights = (weights - constants) // shards + constants
        lora_weights, optimizer_state = lora_weights // shards, optimizer_state // shards

    # --- activations saved by the policy forward (B x T tokens)
    layer = tokens * _layer_saved_per_token(
        shape, config, T, d,
        adapter_input=d if autocast else 4,
        # CUDA's fused dropout saves a bool mask; the CPU kernel saves a noise tensor of the input's dtype
        dropout_mask=1 if device == "cuda" else (d if autocast else 4),
    )
    masks = 2 if shape.eager_attention else 1  # Gemma-2 alternates sliding-window and full attention
    attention_mask = masks * B * T * T * (d if shape.eager_attention else 1)  # 4D mask: additive or bool
    rope = 2 * T * shape.head_dim * d  # cos and sin, shared by every layer
    outside = tokens * (4 * H + 4 + H * d + 16) + attention_mask + rope  # final norm, head rows, their indices
    if config.gradient_checkpointing:
        activations = L * tokens * H * d + outside  # each layer's input hidden state
    else:  # every layer's tensors, and under autocast the compute-dtype copies of the LoRA weights
        activations = L * layer + outside + (lora_weights * d // 4 if autocast else 0)

    # --- transients on top of the saved activations: only the largest is live at the peak
    backward_grads = tokens * (d * H + 4 * F)  # in flight in a layer's backward: the residual's and the MLP's
    recompute = (layer if config.gradient_checkpointing else 0) + backward_grads
    rows = min(chunk_rows(V, half=d == 2, softcap=shape.logit_softcap), tokens)
    # head.FrozenHeadLogps with grad: one chunk's fp32 logits turned into the softmax in place, its
    # half-precision copy for the gradient matmul, tanh' when soft-capped (no logits recomputed in backward)
    logprob_chunks = rows * V * bytes_per_logit(half=d == 2, softcap=shape.logit_softcap)
    kl_pass = _nograd_peak(shape, B, T, d, rows)
    reference_pass = 0 if config.precompute_reference else kl_pass

    dequant = max(linear_sizes) * d if config.load_in_4bit else 0  # bnb dequantizes one weight per matmul
    overhead = dequant + (CUDA_OVERHEAD_BYTES if device == "cuda" else 0)
    # before training, reference log-probs are computed once in no-grad batches of 2 x batch_size
    ref_batch = REFERENCE_BATCH_MULTIPLIER * B
    precompute = _nograd_peak(shape, ref_batch, T, d, min(rows, ref_batch * T)) \
        if config.precompute_reference else 0
    return MemoryEstimate(
        weights=weights, lora_weights=lora_weights, gradients=lora_weights, optimizer_state=optimizer_state,
        activations=int(activations), recompute=int(recompute), logprob_chunks=logprob_chunks,
        kl_pass=int(kl_pass), reference_pass=int(reference_pass), overhead=overhead, precompute=int(precompute),
        fsdp_gathered=int(fsdp_gathered),
        description=dict(
            model=config.model or "demo model", quantization="4-bit NF4" if config.load_in_4bit else "unquantized",
            compute_dtype=compute_dtype, device=device, batch_size=B, max_length=config.max_length,
            gradient_checkpointing=config.gradient_checkpointing, lora_r=config.lora_r,
            lora_params=sum(lora_sizes), optimizer=optimizer, vocab=V, chunk_rows=rows, reference_batch=ref_batch,
            processes=shards,
            overhead_label=("CUDA context + allocator, dequantized weight buffer" if device == "cuda"
                            else "dequantized weight buffer"),
        ),
    )


# ---------------------------------------------------------------------- making a run fit
def fit_plan(config: TrainConfig, budget_gb: float, model_config: dict | PretrainedConfig | None = None, *,
             gpu_name: str | None = None, device: str = "cuda", processes: int = 1
             ) -> list[tuple[str, dict, MemoryEstimate]]:
    """Changes, applied one after another, until the run fits `budget_gb` GiB.

    Returns [(what changed, overrides so far, estimate after it)]; [] when it already fits. The
    order is least harmful first: 4-bit and checkpointing cost nothing in quality, halving the batch
    while doubling accumulation keeps the effective batch (z0 gets noisier below 4 per batch),
    shorter sequences cut long examples, a smaller rank costs capacity.
    """
    if model_config is None:
        model_config = load_model_config(config.model)
    current = config.resolved()  # a copy, with the derived fields filled
    overrides: dict = {}
    plan = []

    def estimate(cfg):
        return estimate_memory(cfg, model_config, gpu_name=gpu_name, device=device, processes=processes)

    def candidates(cfg: TrainConfig):
        if not cfg.load_in_4bit:
            yield "load the base in 4-bit", {"load_in_4bit": True}
        if not cfg.gradient_checkpointing:
            yield "turn gradient checkpointing on (~30% slower)", {"gradient_checkpointing": True}
        while cfg.batch_size > 4:
            yield _halve_batch(cfg)
        if cfg.max_length > 512:
            yield _shorter(cfg, max(512, cfg.max_length // 2))
        while cfg.batch_size > 1:
            yield _halve_batch(cfg, "; z0 is then estimated on fewer examples")
        if cfg.lora_r > 8:
            alpha = max(1, round(cfg.lora_alpha * 8 / cfg.lora_r))  # keep the scale alpha / r
            yield f"lora_r {cfg.lora_r} -> 8, lora_alpha -> {alpha} (less adapter capacity)", {"lora_r": 8, "lora_alpha": alpha}
        while cfg.max_length > 256:
            yield _shorter(cfg, max(256, cfg.max_length // 2))

    if estimate(current).fits(budget_gb):
        return []
    for text, change in candidates(current):
        for key, value in change.items():
            setattr(current, key, value)
        current.validate()
        overrides.update(change)
        result = estimate(current)
        plan.append((text, dict(overrides), result))
        if result.fits(budget_gb):
            break
    return plan


def _halve_batch(cfg: TrainConfig, why: str = "") -> tuple[str, dict]:
    batch, accum = max(1, cfg.batch_size // 2), cfg.gradient_accumulation_steps * 2
    text = (f"batch_size {cfg.batch_size} -> {batch}, gradient_accumulation_steps "
            f"{cfg.gradient_accumulation_steps} -> {accum} (same effective batch{why})")
    return text, {"batch_size": batch, "gradient_accumulation_steps": accum}


def _shorter(cfg: TrainConfig, length: int) -> tuple[str, dict]:
    prompt = min(cfg.max_prompt_length, length // 2)
    text = f"max_length {cfg.max_length} -> {length}, max_prompt_length -> {prompt} (longer examples are cut)"
    return text, {"max_length": length, "max_prompt_length": prompt}


def suggest_fit(config: TrainConfig, budget_gb: float, model_config: dict | PretrainedConfig | None = None, *,
                gpu_name: str | None = None, device: str = "cuda", processes: int = 1) -> list[str]:
    """Readable suggestions that make the run fit in `budget_gb` GiB, each with the estimate after it."""
    plan = fit_plan(config, budget_gb, model_config, gpu_name=gpu_name, device=device, processes=processes)
    lines = [f"{text}: {format_bytes(est.total)}" for text, _, est in plan]
    if plan and not plan[-1][2].fits(budget_gb):
        lines.append(f"still does not fit in {budget_gb:g} GiB: use a smaller model or a GPU with more memory")
    elif plan:
        flags = " ".join(f"--{k} {str(v).lower() if isinstance(v, bool) else v}" for k, v in plan[-1][1].items())
        lines.append(f"fits with: {flags}")
    return lines


def estimate_hours(config: TrainConfig, model_config: dict | PretrainedConfig | None = None, *,
                   num_examples: int, mean_tokens: float, tflops: float) -> float:
    """Rough training time: FLOPs of the whole run divided by an assumed sustained TFLOP/s.

    Per token, a frozen base costs 2N (forward) + 2N (backward to activations only) + 2N (checkpoint
    recompute) + 2N (no-grad KL forward) + 4N for the reference log-probs of the batch and the KL
    batch (each step, or once per epoch when cached: the same FLOPs, cached is just better batched).
    N counts the linear layers and the output head; attention and the LoRA matmuls are ignored.
    """
    if model_config is None:
        model_config = load_model_config(config.model)
    shape = ModelShape.from_config(model_config)
    n = shape.layers * sum(i * o for _, i, o in shape.linears()) + shape.vocab * shape.hidden
    per_token = 2 + 2 + (2 if config.gradient_checkpointing else 0) + 2 + 4
    return per_token * n * num_examples * mean_tokens * config.num_epochs / (tflops * 1e12) / 3600


# ---------------------------------------------------------------------- command line
