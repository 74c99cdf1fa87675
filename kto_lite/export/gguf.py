"""GGUF files for llama.cpp, Ollama and LM Studio: a merged model, or the LoRA adapter alone.

Written with `gguf` (llama.cpp's own Python package: GGUFWriter, its tensor-name maps and its Q8_0
quantizer), following the conventions of llama.cpp's convert_hf_to_gguf.py / convert_lora_to_gguf.py:
- tensor names from `gguf.get_tensor_name_map` (model.layers.0.self_attn.q_proj -> blk.0.attn_q);
- Llama (and Mistral, which llama.cpp runs as "llama") stores q/k rows in the interleaved rotary
  order (`_permute_qk`); Gemma-2 stores its RMSNorm weights as 1 + w (its norm multiplies by 1 + w);
- 1-D tensors (norms, biases) in F32, matrices in F16 or Q8_0 (rows not a multiple of 32: F16);
- a LoRA file is general.type "adapter", adapter.type "lora", adapter.lora.alpha, and tensors
  "<gguf name>.weight.lora_a" (r, in) / ".lora_b" (out, r); llama.cpp scales B @ A by alpha / r.

The tokenizer goes in as metadata (gguf_vocab.py). Architectures: see ARCHITECTURES.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kto_lite.errors import UnsupportedModel
from kto_lite.export.gguf_vocab import add_tokenizer
from kto_lite.files import atomic_path
from kto_lite.missing_model import explained_load_errors
from kto_lite.model import hub_options

QUANTS = ("f16", "q8_0")


@dataclass(frozen=True)
class Arch:
    gguf_name: str  # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES)
    permute_qk: bool = False  # Llama's rotary layout (see _permute_qk)
    norm_plus_one: bool = False  # Gemma's RMSNorm scales by (1 + w); llama.cpp stores 1 + w


# transformers model_type -> how llama.cpp runs it
ARCHITECTURES = {
    "llama": Arch("llama", permute_qk=True),
    "mistral": Arch("llama", permute_qk=True),  # llama.cpp runs Mistral as Llama
    "qwen2": Arch("qwen2"),
    "gemma2": Arch("gemma2", norm_plus_one=True),
}


def architecture(config) -> Arch:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        names = getattr(config, "architectures", None) or [model_type]
        raise UnsupportedModel(
            f"GGUF export supports {', '.join(sorted(ARCHITECTURES))}; this model is {model_type!r} "
            f"({', '.join(map(str, names))}). Export the merged folder (--merge) and convert it with "
            "llama.cpp's convert_hf_to_gguf.py, which knows more architectures.")
    return ARCHITECTURES[model_type]


def _gguf():
    import gguf

    return gguf


def _arch_enum(arch: Arch):
    gguf = _gguf()
    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf_name)


# --------------------------------------------------------------------------- hyperparameters


def _rope(config) -> dict:
    """rope parameters, transformers 5 (`rope_parameters`) or older (`rope_theta` + `rope_scaling`)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_hparams(writer, config, arch: Arch) -> None:
    """The architecture's hyperparameters under llama.cpp's key names (convert_hf_to_gguf.py)."""
    gguf = _gguf()
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    head_dim = _head_dim(config)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = _rope(config)
    if arch.gguf_name == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
    else:
        writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif kind not in ("default", "llama3"):  # llama3: a rope_freqs tensor (rope_freqs below)
        raise UnsupportedModel(f"rope type {kind!r} is not supported by the GGUF export "
                               "(supported: default, linear, yarn, llama3)")


def rope_freqs(config) -> np.ndarray | None:
    """Llama-3.1-style rope: llama.cpp divides each rotary frequency by a factor from a `rope_freqs` tensor.

    factor_i = default_inv_freq_i / llama3_inv_freq_i, both from transformers' own rope functions,
    so the file rotates exactly as transformers does. None for other rope types.
    """
    if _rope(config)["rope_type"] != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim = _head_dim(config)
    base = float(_rope(config)["rope_theta"])
    default = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (head_dim / 2,)
    llama3, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (default / llama3.double()).float().numpy()


# --------------------------------------------------------------------------- tensors


def _permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotary layout (halves) -> llama.cpp's (interleaved pairs), per head; rows of (out, ...)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _fix_rows(hf_name: str, w: torch.Tensor, config, arch: Arch) -> torch.Tensor:
    """What llama.cpp's layout needs on top of a rename: the q/k row order of Llama, Gemma's 1 + w."""
    if arch.permute_qk and ".self_attn.q_proj." in hf_name + ".":
        w = _permute_qk(w, config.num_attention_heads)
    elif arch.permute_qk and ".self_attn.k_proj." in hf_name + ".":
        w = _permute_qk(w, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return w


def gguf_name(name_map, hf_name: str) -> str:
    """model.layers.0.self_attn.q_proj.weight -> blk.0.attn_q.weight."""
    new = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise UnsupportedModel(f"{hf_name}: no GGUF tensor name for this weight")
    return new


def model_tensors(model, arch: Arch) -> Iterator[tuple[str, torch.Tensor]]:
    """(gguf name, fp32 tensor in llama.cpp's layout) for every weight of a merged model."""
    gguf = _gguf()
    config = model.config
    name_map = gguf.get_tensor_name_map(_arch_enum(arch), config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, w in model.state_dict().items():
        if (tied and hf_name == "lm_head.weight") or "rotary_emb" in hf_name:
            continue  # the tied head is the embedding; rotary buffers are recomputed by llama.cpp
        w = _fix_rows(hf_name.removesuffix(".weight").removesuffix(".bias"), w.detach().float().cpu(), config, arch)
        if arch.norm_plus_one and hf_name.endswith("norm.weight"):
            w = w + 1
        yield gguf_name(name_map, hf_name), w


def _encode(w: torch.Tensor, quant: str):
    """(array, raw dtype or None): 1-D -> F32; matrices -> F16, or Q8_0 when rows split into 32-blocks."""
    gguf = _gguf()
    if w.ndim == 1 or quant == "f32":
        return w.numpy().astype(np.float32), None
    if quant == "q8_0" and w.shape[-1] % 32 == 0:
        return gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return w.numpy().astype(np.float16), None


# --------------------------------------------------------------------------- writing


def _write(out: Path, fill, needed: int | None = None) -> Path:
    """Write a GGUF through `fill(writer)` into a temporary sibling, then rename: never half a file at `out`.
    needed: about the bytes it takes (for the message of a full disk)."""
    out = Path(out)
    with atomic_path(out, needed=needed) as tmp:
        writer = fill(tmp)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def write_gguf(model, tokenizer, out: str | Path, *, quant: str = "f16", name: str | None = None,
               base_gguf: str | None = None) -> Path:
    """A merged model (a plain transformers model) as one GGUF file with its tokenizer and chat template.

    quant: f16 (exact up to fp16 rounding) or q8_0 (8-bit blocks of 32, ~half the size).
    base_gguf: the GGUF the run was trained from; its tokenizer metadata is copied as it is.
    """

    if quant not in QUANTS:
        raise ValueError(f"quant {quant!r}: use one of {', '.join(QUANTS)}")
    gguf = _gguf()
    config = model.config
    arch = architecture(config)

    def fill(path):
        writer = gguf.GGUFWriter(path, arch.gguf_name)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or Path(str(getattr(config, "_name_or_path", "") or "model")).name)
        file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
        writer.add_file_type(file_type)
        if quant == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hparams(writer, config, arch)
        add_tokenizer(writer, tokenizer, config, base_gguf=base_gguf)
        freqs = rope_freqs(config)
        if freqs is not None:
            writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freqs)
        for tensor_name, w in model_tensors(model, arch):
            data, raw_dtype = _encode(w, quant)
            writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        return writer

    bytes_per_weight = 34 / 32 if quant == "q8_0" else 2  # q8_0: 32 int8 and an fp16 scale per block
    return _write(out, fill, needed=int(sum(p.numel() for p in model.parameters()) * bytes_per_weight))


# --------------------------------------------------------------------------- the adapter alone


@dataclass
class LoraTensors:
    alpha: float  # adapter.lora.alpha: llama.cpp scales B @ A by alpha / r
    tensors: dict[str, torch.Tensor]  # gguf name -> fp32, "blk.0.attn_q.weight.lora_a" (r, in) / "...lora_b" (out, r)


def lora_tensors(adapter_dir: str | Path, config) -> LoraTensors:
    """The adapter's A and B per module, renamed and laid out for llama.cpp, scales folded where needed.

    peft scales B @ A by lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)), per module when rank_pattern /
    alpha_pattern say so; llama.cpp by one adapter.lora.alpha / r. B carries any difference, so each
    module's B @ A * alpha / r equals peft's update exactly.
    """
    from peft import LoraConfig
    from peft.utils import load_peft_weights

    gguf = _gguf()
    arch = architecture(config)
    lora = LoraConfig.from_pretrained(str(adapter_dir))
    if getattr(lora, "use_dora", False):
        raise UnsupportedModel("a DoRA adapter has no GGUF LoRA form; export the merged model (--gguf) instead")
    if lora.modules_to_save:
        raise UnsupportedModel(f"the adapter also trains whole modules ({lora.modules_to_save}); a GGUF LoRA "
                               "cannot carry them: export the merged model (--gguf) instead")
    weights = load_peft_weights(str(adapter_dir), device="cpu")
    name_map = gguf.get_tensor_name_map(_arch_enum(arch), config.num_hidden_layers)
    alpha = lora.lora_alpha * (math.sqrt(lora.r) if lora.use_rslora else 1.0)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(k for k in weights if k.endswith("lora_A.weight")):
        module = key.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        a = weights[key].float()  # (r, in)
        b = weights[key.replace("lora_A", "lora_B")].float()  # (out, r)
        if a.ndim != 2 or module.endswith("embed_tokens"):
            raise UnsupportedModel(f"{module}: only LoRA on linear layers can be written as a GGUF LoRA")
        r = a.shape[0]
        short = module.rsplit(".", 1)[-1]
        r_peft = lora.rank_pattern.get(short, lora.r) if lora.rank_pattern else lora.r
        alpha_peft = lora.alpha_pattern.get(short, lora.lora_alpha) if lora.alpha_pattern else lora.lora_alpha
        scale_peft = alpha_peft / (math.sqrt(r_peft) if lora.use_rslora else r_peft)
        b = b * (scale_peft / (alpha / r))  # 1.0 for a plain adapter
        b = _fix_rows(module, b, config, arch)  # q/k rows in llama.cpp's rotary order; A's columns are inputs
        name = gguf_name(name_map, module + ".weight")
        out[f"{name}.lora_a"], out[f"{name}.lora_b"] = a.contiguous(), b.contiguous()
    if not out:
        raise UnsupportedModel(f"{adapter_dir}: no LoRA weights found in the adapter")
    return LoraTensors(alpha, out)


def write_lora_gguf(adapter_dir: str | Path, out: str | Path, config, *, name: str | None = None) -> Path:
    """The adapter alone as a GGUF LoRA (llama.cpp `--lora`, Ollama `ADAPTER`), tensors in F32.

    `config`: the base model's transformers config (its architecture and head counts).
    """
    gguf = _gguf()
    arch = architecture(config)
    lora = lora_tensors(adapter_dir, config)

    def fill(path):
        writer = gguf.GGUFWriter(path, arch.gguf_name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name or Path(adapter_dir).resolve().name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora.alpha))
        for tensor_name, w in lora.tensors.items():
            writer.add_tensor(tensor_name, w.numpy().astype(np.float32))
        return writer

    return _write(out, fill)


def read_metadata(path: str | Path) -> dict:
    """A GGUF file's scalar and string metadata (not the token arrays), for checks and messages."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    values = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        values[key] = field.contents()
    return values


def base_config(base: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """The transformers config of a base: a folder / hub name (at `revision`), or a .gguf file (read by
    transformers)."""
    from transformers import AutoConfig

    with explained_load_errors(base, revision):  # a base not found: which, and what to do (exit 2)
        if base.endswith(".gguf"):
            path = Path(base)
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        return AutoConfig.from_pretrained(base, **hub_options(base, revision, trust_remote_code))
