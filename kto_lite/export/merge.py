"""Merge a trained LoRA adapter into its base, so the result runs without peft.

Two merges, because an adapter trained on a 4-bit (QLoRA) base learned to correct the 4-bit
weights, not the original ones:

- "quantized" (the default for a 4-bit run): load the base exactly as training did (NF4, double
  quantization: `model.load_base`), de-quantize every 4-bit weight and add the LoRA update,
      W_merged = dequant(NF4(W)) + scale * B @ A      # (out, in), scale = lora_alpha / r
  and store it in 16 bits. The merged model computes what the trained model computed, up to the
  16-bit rounding. Nothing is quantized again (peft's own 4-bit merge re-quantizes, and rounding
  back to 4 bits loses most of the small update).
- "full": add the update to the original full-precision weights (what most tools do). The adapter
  then meets weights it never saw during training; the difference is measured by `logprob_drift`.

A run trained without 4-bit quantization has one merge only ("full"; both would be the same).
Everything downstream (a merged folder, a GGUF file, the Hub) starts from `merge`'s model.
The merge runs where `load_base` puts the model (the GPU if there is one) and ends on the CPU.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kto_lite.data import load_data, tokenize
from kto_lite.model import (
    compute_dtype,
    hub_options,
    keep_4bit_layout_trainable,
    load_adapter,
    load_tokenizer,
)
from kto_lite.runs import check_adapter_dir, run_base, run_settings

MERGE_FROM = ("quantized", "full")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


@dataclass
class Merged:
    """A merged model in memory, with what it was made from."""

    model: nn.Module  # a plain transformers model on the CPU, no peft, no quantization
    tokenizer: object
    base: str  # the base model it was merged into
    merge_from: str  # "quantized" or "full"
    trained_4bit: bool  # the run trained on a 4-bit base
    drift: dict[str, float] = field(default_factory=dict)  # merge_from -> mean |Δ log p| vs the trained model


def trained_in_4bit(adapter_dir: str | Path) -> bool:
    """The run's load_in_4bit (config.yaml); True when there is no record, as training's default."""
    return bool(run_settings(adapter_dir).get("load_in_4bit", True))


def resolve_merge_from(adapter_dir: str | Path, merge_from: str | None) -> str:
    """None: "quantized" for a 4-bit run, else "full". A non-4-bit run has only the full merge."""
    if merge_from is not None and merge_from not in MERGE_FROM:
        raise ValueError(f"merge_from {merge_from!r}: use one of {', '.join(MERGE_FROM)}")
    if not trained_in_4bit(adapter_dir):
        return "full"  # trained on the unquantized base: that merge reproduces the trained model
    return merge_from or "quantized"


def base_dtype(base: str) -> torch.dtype:
    """The precision the base was published in (config.json's dtype), bf16 when it does not say."""
    config = Path(base) / "config.json"
    if config.is_file():
        values = json.loads(config.read_text())
        name = values.get("dtype") or values.get("torch_dtype")
        if name in DTYPES:
            return DTYPES[name]
    return torch.bfloat16


def merge_dtype(dtype: str = "auto", base: str | None = None) -> torch.dtype:
    """auto: the base's own precision (bf16 for most published models; fp32 for the demo model)."""
    if dtype == "auto":
        return base_dtype(base) if base else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


# --------------------------------------------------------------------------- loading


def _tokenizer_for(adapter_dir: Path, base: str | None):
    """The run's tokenizer (saved next to the adapter), else the base's, loaded as training loaded it."""
    if (adapter_dir / "tokenizer_config.json").is_file():
        return load_tokenizer(str(adapter_dir))
    return run_base(adapter_dir, base=base).tokenizer()


def load_full_base(base: str, dtype: torch.dtype, *, revision: str | None = None, trust_remote_code: bool = False):
    """The unquantized base on the CPU (at `revision` for a Hub id). A `.gguf` file is de-quantized by
    transformers' GGUF loader."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if base.endswith(".gguf"):
        path = Path(base)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                     device_map={"": "cpu"})
        return _plain(model)
    options = hub_options(base, revision, trust_remote_code)
    if getattr(AutoConfig.from_pretrained(base, **options), "quantization_config", None):
        raise ValueError(f"{base} is a quantized checkpoint; merging needs the full-precision base it was "
                         "made from: give it with --base / base=")
    return AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map={"": "cpu"}, **options)


def load_trained(adapter_dir: str | Path, base: str | None = None):
    """The model as training left it: the base loaded as training did (its revision, 4-bit or not) + the
    adapter, eval mode. base: another base model than the run's (`runs.run_base`)."""

    adapter_dir = check_adapter_dir(adapter_dir)
    model = run_base(adapter_dir, base=base).load(load_in_4bit=trained_in_4bit(adapter_dir))
    keep_4bit_layout_trainable(model)  # the layout training used (see model.py): same kernels, same numbers
    model = load_adapter(model, adapter_dir)
    model.eval()
    return model


def _plain(model):
    """Drop what says "quantized" from a model whose weights are plain tensors now, so it saves as such."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # config, quantizer, the "cannot cast" guard
    if getattr(model, "is_loaded_in_4bit", False):
        model.is_loaded_in_4bit = False
    return model


# --------------------------------------------------------------------------- the two merges


def merge_full(adapter_dir: Path, base: str | None, dtype: torch.dtype):
    """W + scale * B @ A on the original weights (peft's merge, at `dtype`)."""
    from peft import PeftModel

    run = run_base(adapter_dir, base=base)  # the run's own base (its revision), unless another is named
    model = load_full_base(run.model, dtype, revision=run.revision, trust_remote_code=run.options["trust_remote_code"])
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


def merge_quantized(trained, dtype: torch.dtype):
    """dequant(NF4(W)) + scale * B @ A for every adapted layer; dequant(NF4(W)) for the other 4-bit layers.

    `trained` is `load_trained`'s PeftModel on the 4-bit base; it is consumed (its layers are replaced).
    Each weight is computed in fp32 and rounded once, to `dtype`.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from peft.tuners.lora import LoraLayer

    deltas = {}  # module name in the base -> (out, in) fp32 update, on the model's device
    for name, module in trained.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_variant:  # DoRA and friends rescale W; not a plain W + BA
                    raise ValueError(f"{name}: a LoRA variant ({type(module.lora_variant[adapter]).__name__}) "
                                     "cannot be merged into de-quantized weights here; use merge_from full")
                if module.lora_bias.get(adapter):
                    raise ValueError(f"{name}: LoRA with a bias is not supported by the quantized merge")
                if adapter in module.lora_A:
                    key = name.removeprefix("base_model.model.")
                    deltas[key] = deltas.get(key, 0) + module.get_delta_weight(adapter).float()
    model = trained.unload()  # the 4-bit base, LoRA wrappers removed (not merged)
    for name, module in list(model.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = dequantize_4bit(module.weight.data, module.weight.quant_state).float()  # (out, in)
        if name in deltas:
            weight += deltas.pop(name)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype,
                           device="cpu")
        with torch.no_grad():
            linear.weight.copy_(weight.to(dtype))
            if module.bias is not None:
                linear.bias.copy_(module.bias.detach().float().to(dtype))
        model.set_submodule(name, linear)
    if deltas:  # an adapted layer that was not 4-bit (e.g. lm_head): add its update to the plain weight
        for name, delta in deltas.items():
            layer = model.get_submodule(name)
            with torch.no_grad():
                layer.weight.copy_((layer.weight.float() + delta.to(layer.weight.device)).to(layer.weight.dtype))
    model = _plain(model).to("cpu")
    for param in model.parameters():  # parameters only: buffers such as rotary inv_freq stay fp32, as on loading
        param.data = param.data.to(dtype)
    return model


def merge(adapter_dir: str | Path, *, merge_from: str | None = None, dtype: str = "auto",
          base: str | None = None, trained=None) -> Merged:
    """The merged model in memory (CPU). merge_from None: "quantized" for a 4-bit run, else "full".

    `trained`: an already loaded `load_trained` model to build the quantized merge from (it is consumed).
    """
    adapter_dir = check_adapter_dir(adapter_dir)
    source = run_base(adapter_dir, base=base).model  # what from_pretrained loads (base None: the run's)
    merge_from = resolve_merge_from(adapter_dir, merge_from)
    torch_dtype = merge_dtype(dtype, source)
    if merge_from == "quantized":
        model = merge_quantized(trained if trained is not None else load_trained(adapter_dir, base), torch_dtype)
    else:
        model = merge_full(adapter_dir, base, torch_dtype)
    model.config.use_cache = True  # load_base turned it off for training; a shipped model generates
    model.eval()
    return Merged(model, _tokenizer_for(adapter_dir, base), source, merge_from, trained_in_4bit(adapter_dir))


# --------------------------------------------------------------------------- how far a merge is from the trained model


def drift_rows(adapter_dir: str | Path, tokenizer, n: int = 8, max_length: int = 256) -> list[tuple[list[int], int]]:
    """Up to `n` rows of the run's eval_data (else the last rows of its data) as (token ids, prompt length).

    Tokenized as training tokenized them (chat template, end-of-turn). [] when the run names no
    readable data file: the drift is then not measured.
    """

    settings = run_settings(adapter_dir)
    path = settings.get("eval_data") or settings.get("data")
    if not path or not Path(path).exists() or n <= 0:
        return []
    examples, _ = load_data(path, settings.get("columns") or None)  # the run's own column names
    rows = tokenize(examples[-n:], tokenizer, max_length=max_length, max_prompt_length=None,
                    use_chat_template=settings.get("use_chat_template"))
    return [(r.prompt_ids + r.completion_ids, len(r.prompt_ids)) for r in rows]


@contextlib.contextmanager
def computing_in(model, dtype: torch.dtype):
    """Parameters widened to `dtype` for a while, then back (lossless): a merged fp16 / bf16 model is
    compared in the precision the trained model computes in, so the drift measures the weights."""
    stored = {p: p.dtype for p in model.parameters()}
    for p in stored:
        p.data = p.data.to(dtype)
    try:
        yield model
    finally:
        for p, original in stored.items():
            p.data = p.data.to(original)


@torch.no_grad()
def token_logps(model, rows: list[tuple[list[int], int]]) -> list[torch.Tensor]:
    """log p of each completion token given everything before it, per row: [(n_completion,) fp32].

    Computed in the training compute dtype (model.compute_dtype: fp32 on the CPU).
    """

    if any(p.dtype in (torch.float16, torch.bfloat16, torch.float32) and p.dtype != compute_dtype()
           for p in model.parameters()) and not getattr(model, "is_loaded_in_4bit", False):
        with computing_in(model, compute_dtype()):
            return token_logps(model, rows)
    device = next(model.parameters()).device
    out = []
    for ids, prompt_len in rows:
        x = torch.tensor([ids], device=device)
        logits = model(input_ids=x).logits[0, :-1].float()  # (T-1, V): position t predicts token t+1
        logps = logits.log_softmax(-1).gather(-1, x[0, 1:, None]).squeeze(-1)  # (T-1,)
        out.append(logps[max(prompt_len - 1, 0):].cpu())
    return out


def logprob_drift(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """Mean |log p_reference - log p_other| per completion token (nats), over all rows."""
    diffs = torch.cat([(a - b).abs() for a, b in zip(reference, other, strict=True)])
    return float(diffs.mean()) if diffs.numel() else float("nan")
