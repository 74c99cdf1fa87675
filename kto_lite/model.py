"""The model: a (4-bit) base with LoRA adapters, which doubles as its own reference.

The reference model of KTO is the base with the adapters switched off, so the weights exist once
in memory. `reference_mode` is the one place that switch happens.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from kto_lite.config import TrainConfig
from kto_lite.demo import DEMO_MODEL_DIR
from kto_lite.errors import ConfigError
from kto_lite.gguf_input import converted_dir, gguf_source
from kto_lite.missing_model import explained_load_errors


def resolve_model(name: str | None, *, revision: str | None = None) -> str:
    """What `from_pretrained` should load: a hub id or folder as given; a GGUF model's converted
    folder (converting it once, see gguf_input.py); empty means the built-in demo model (checked whole)."""
    if not name or Path(name).resolve() == DEMO_MODEL_DIR.resolve():
        check_demo_model()
        return str(DEMO_MODEL_DIR)
    gguf = gguf_source(str(name), revision=revision)
    return str(converted_dir(gguf)) if gguf is not None else str(name)


# --------------------------------------------------------------------------- the built-in demo model, whole
DEMO_CHECKSUMS = "SHA256SUMS"  # in the demo model's folder, `sha256sum -c` format; written by build_demo_model.py
_demo_checked: set = set()  # (name, size, mtime_ns) of every file found whole in this process


def _sha256(path: Path) -> str:
    """Of the bytes; text files with their line ends as LF (a git checkout on Windows may make them CRLF)."""
    data = path.read_bytes()
    return hashlib.sha256(data.replace(b"\r\n", b"\n") if path.suffix in (".json", ".jinja") else data).hexdigest()


def write_demo_checksums(folder: Path | None = None) -> Path:
    """Record the demo model's files (recipes/build_demo_model.py, after building it)."""
    folder = folder or DEMO_MODEL_DIR
    lines = [f"{_sha256(f)}  {f.name}\n" for f in sorted(folder.iterdir()) if f.is_file() and f.name != DEMO_CHECKSUMS]
    (folder / DEMO_CHECKSUMS).write_text("".join(lines))
    return folder / DEMO_CHECKSUMS


def check_demo_model(folder: Path | None = None) -> None:
    """The demo model ships with kto_lite and cannot be recomputed: a file missing, cut short or changed is said,
    with how to restore it, instead of failing deep inside transformers. Each file is hashed once per process
    (and again only if its size or modification time changes)."""
    folder = folder or DEMO_MODEL_DIR
    sums = folder / DEMO_CHECKSUMS
    if not sums.is_file():  # an installation without the record: nothing to compare with
        return
    for line in sums.read_text().splitlines():
        expected, name = line.split(maxsplit=1)
        path = folder / name
        stat = path.stat() if path.is_file() else None
        if stat is not None and (name, stat.st_size, stat.st_mtime_ns) in _demo_checked:
            continue
        if stat is None or _sha256(path) != expected:
            what = "is missing" if stat is None else f"is damaged ({stat.st_size} bytes, not the ones shipped)"
            raise ConfigError(
                f"the built-in demo model's {path} {what}. It ships with kto_lite and cannot be rebuilt from here: "
                "restore it with `git checkout kto_lite/demo/model` in a clone of the repository, or reinstall "
                "kto_lite (pip install --force-reinstall kto-lite)")
        _demo_checked.add((name, stat.st_size, stat.st_mtime_ns))


# --------------------------------------------------------------------------- precision
# Native bf16 arithmetic arrived with Ampere (compute capability 8.0). `torch.cuda.is_bf16_supported()`
# also counts emulation and says True on a T4 (7.5), where bf16 matmuls run several times slower than
# fp16: so the choice is made from the compute capability alone.
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
BF16_MIN_CAPABILITY = (8, 0)


def _cuda_index() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))  # the GPU this process uses (see device_map)


def choose_precision(setting: str = "auto") -> str:
    """"bf16" | "fp16" | "no" (fp32) for this machine; `setting` is TrainConfig.mixed_precision.

    auto: bf16 on compute capability >= 8.0 (Ampere and newer), fp16 below (Turing, Volta: T4, V100,
    RTX 20xx), fp32 on CPU. An explicit bf16 below 8.0, or bf16/fp16 without a GPU, is refused.
    """
    if setting not in ("auto", *PRECISION_DTYPES):
        raise ConfigError(f"mixed_precision must be one of auto, bf16, fp16, no; got {setting!r}")
    if not torch.cuda.is_available():
        if setting in ("bf16", "fp16"):
            raise ConfigError(f"mixed_precision {setting} needs a CUDA GPU and none is visible; "
                              "on CPU training runs in fp32: use auto or no")
        return "no"
    capability = tuple(torch.cuda.get_device_capability(_cuda_index()))
    native_bf16 = capability >= BF16_MIN_CAPABILITY
    if setting == "bf16" and not native_bf16:
        name = torch.cuda.get_device_name(_cuda_index())
        raise ConfigError(f"mixed_precision bf16 needs compute capability 8.0 (Ampere) or newer; {name} has "
                          f"{capability[0]}.{capability[1]} and would only emulate it, slowly: use fp16 or auto")
    if setting != "auto":
        return setting
    return "bf16" if native_bf16 else "fp16"


# Architectures whose activations exceed fp16's range (65,504) in normal use: trained in fp16 they overflow to
# inf, and the loss scaler skips step after step (Gemma-2/3: large residual-stream values, documented by their
# authors' bf16-only releases). model_type -> the name users know.
FP16_OVERFLOW = {"gemma2": "Gemma-2", "gemma3": "Gemma-3", "gemma3_text": "Gemma-3"}


def check_precision(name: str | None, precision: str, *, revision: str | None = None,
                    trust_remote_code: bool = False) -> None:
    """Refuse, before anything is loaded, a model that cannot train in `precision` (choose_precision's answer):
    one of FP16_OVERFLOW in fp16 (a GPU without bf16, or mixed_precision: fp16), with what to do instead."""
    if precision != "fp16":
        return
    from transformers import AutoConfig

    with explained_load_errors(name or DEMO_MODEL_DIR, revision):  # a name not found: which, and what to do
        source = resolve_model(name, revision=revision)
        model_type = AutoConfig.from_pretrained(source, **hub_options(source, revision, trust_remote_code)).model_type
    if model_type in FP16_OVERFLOW:
        gpu = (f"this GPU ({torch.cuda.get_device_name(_cuda_index())}) has no bf16" if torch.cuda.is_available()
               and tuple(torch.cuda.get_device_capability(_cuda_index())) < BF16_MIN_CAPABILITY
               else "mixed_precision is fp16")
        raise ConfigError(
            f"{name or source} is a {FP16_OVERFLOW[model_type]} model, whose activations overflow fp16, and {gpu}: "
            "training would skip step after step and stop. Train in fp32 with mixed_precision: no (more memory "
            "for activations, slower), use bf16 on a GPU that has it (compute capability 8.0+), or choose another "
            "model (Llama, Qwen, Mistral train well in fp16).")


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a precision name: bf16, fp16, no (fp32)."""
    try:
        return PRECISION_DTYPES[precision]
    except KeyError:
        raise ConfigError(f"unknown precision {precision!r}; one of {', '.join(PRECISION_DTYPES)}") from None


def compute_dtype() -> torch.dtype:
    """The dtype `mixed_precision: auto` computes in here: bf16 / fp16 by compute capability, fp32 on CPU."""
    return precision_dtype(choose_precision("auto"))


# --------------------------------------------------------------------------- attention
def choose_attn_implementation(setting: str | None, dtype: torch.dtype) -> str:
    """The attention kernel: an explicit setting checked against what transformers knows, or
    flash_attention_2 where it can run (CUDA, compute capability >= 8.0, 16-bit, `flash_attn`
    installed), else sdpa."""
    if setting:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
        if setting not in known and "/" not in setting:  # "org/repo": a kernel from the Hub
            raise ConfigError(f"attn_implementation {setting!r} is unknown; use one of {', '.join(known)}, "
                              "or leave it empty for flash-attention when installed, else sdpa")
        return setting
    flash = (torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
             and tuple(torch.cuda.get_device_capability(_cuda_index())) >= BF16_MIN_CAPABILITY
             and dtype in (torch.bfloat16, torch.float16))
    return "flash_attention_2" if flash else "sdpa"


# --------------------------------------------------------------------------- loading
def device_map() -> dict:
    if torch.cuda.is_available():
        return {"": _cuda_index()}  # one full copy per process
    return {"": "cpu"}


def hub_options(source: str, revision: str | None, trust_remote_code: bool) -> dict:
    """from_pretrained options. The token needs none: huggingface_hub reads HF_TOKEN or the saved login."""
    options = {"trust_remote_code": trust_remote_code}
    if revision and not Path(source).exists():  # a local folder (or converted GGUF) has no revisions
        options["revision"] = revision
    return options


def load_tokenizer(name: str | None, *, revision: str | None = None, trust_remote_code: bool = False):
    with explained_load_errors(name or DEMO_MODEL_DIR, revision):  # a name not found: which, and what to do
        source = resolve_model(name, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(source, **hub_options(source, revision, trust_remote_code))
    if tokenizer.pad_token_id is None:  # Llama-style tokenizers ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(name: str | None, *, load_in_4bit: bool = True, precision: str = "auto", revision: str | None = None,
              trust_remote_code: bool = False, attn_implementation: str | None = None, fsdp: bool = False):
    """The base model, 4-bit NF4 with double quantization (QLoRA), or unquantized.

    precision: TrainConfig.mixed_precision (see choose_precision): the dtype of the unquantized
    weights and of the 4-bit layers' compute. attn_implementation: see choose_attn_implementation.
    fsdp: store the packed 4-bit weights in the compute dtype, so that FSDP, which shards floating-point
    tensors, can shard them (bitsandbytes' FSDP-QLoRA support).
    """
    dtype = compute_dtype() if precision == "auto" else precision_dtype(choose_precision(precision))
    quantization = None
    if load_in_4bit:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",  # the QLoRA paper's normal-float type
            bnb_4bit_use_double_quant=True,  # quantize the quantization constants: ~0.4 bit/param saved
            bnb_4bit_compute_dtype=dtype,
            **({"bnb_4bit_quant_storage": dtype} if fsdp else {}),
        )
    attn = choose_attn_implementation(attn_implementation, dtype)
    try:
        with explained_load_errors(name or DEMO_MODEL_DIR, revision):  # a name not found: which, and what to do
            source = resolve_model(name, revision=revision)
            options = dict(dtype=dtype, quantization_config=quantization, device_map=device_map(),
                           **hub_options(source, revision, trust_remote_code))
            try:
                model = AutoModelForCausalLM.from_pretrained(source, attn_implementation=attn, **options)
            except ValueError as e:  # a model without SDPA support (custom code): the automatic choice falls back
                if attn_implementation or "scaled_dot_product_attention" not in str(e):
                    raise
                model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager", **options)
    except (ImportError, RuntimeError) as e:
        if load_in_4bit and "bitsandbytes" in str(e).lower():
            raise RuntimeError(
                f"4-bit loading failed: bitsandbytes has no support for this machine ({e}). "
                "Set load_in_4bit: false to train an unquantized base."
            ) from e
        raise
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    return model


def keep_4bit_layout_trainable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight on its first eval-mode
    no-grad forward (our reference and KL passes); its kernel then returns no gradient to its input,
    which silently corrupts the LoRA gradients of every earlier layer. Models that train keep the
    trainable layout.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def add_lora(model, config: TrainConfig) -> PeftModel:
    """Attach the trainable LoRA adapter "default": fresh (B = 0, so the policy starts equal to the
    reference), or a copy of `config.init_adapter` to continue from. With reference "init_adapter", that
    adapter is also loaded frozen as "reference" (a second small adapter, not a second base)."""
    config = config.resolved()  # lora_alpha and friends derived, if the caller has not done it
    for p in model.parameters():  # only LoRA weights train; peft freezes the rest, we make sure
        p.requires_grad_(False)
    keep_4bit_layout_trainable(model)
    if config.init_adapter:
        model = PeftModel.from_pretrained(model, str(config.init_adapter), is_trainable=True)
        if config.reference == "init_adapter":
            model.load_adapter(str(config.init_adapter), adapter_name="reference", is_trainable=False)
            model.set_adapter("default")
    else:
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=config.lora_target_modules, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    if config.gradient_checkpointing:
        # non-reentrant checkpointing needs no `enable_input_require_grads` hack and works with
        # frozen embeddings; peft/transformers only recompute during training-mode passes
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            f"no trainable parameter: lora_target_modules={config.lora_target_modules!r} matched nothing "
            f"in {type(model.get_base_model()).__name__}"
        )
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # LoRA weights and their optimizer state in fp32, for stable updates
    return model


def load_adapter(base, adapter_dir: str | Path, *, trainable: bool = False) -> PeftModel:
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)


def has_reference_adapter(model) -> bool:
    return "reference" in getattr(model, "peft_config", {})


def base_model(model):
    """The transformers *ForCausalLM under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode (no dropout) for the block, the model's training mode restored after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def within_rounding(ours: torch.Tensor, reference: torch.Tensor, *, half: bool) -> bool:
    """Whether two computations of the same numbers agree up to rounding: |ours - reference| <= tol * (1 + max
    |reference|), tol 3e-2 when either ran in fp16/bf16, else 1e-4 (a real difference is far larger)."""
    if ours.shape != reference.shape:
        return False
    tolerance = (3e-2 if half else 1e-4) * (1 + reference.abs().max().item())
    return bool((ours.float() - reference.float()).abs().max() <= tolerance)


@contextlib.contextmanager
def reference_mode(model):
    """Make `model` act as the KTO reference: no grad, eval mode, and the adapters switched off, or, when
    the model holds a frozen "reference" adapter (config.reference: init_adapter), that adapter instead.

    Eval mode also switches off LoRA dropout and gradient checkpointing for these passes (a no-grad
    pass has nothing to recompute). Training mode and the trainable adapter are restored on exit.
    """
    with eval_mode(model):
        try:
            if has_reference_adapter(model):
                model.set_adapter("reference", inference_mode=True)  # also freezes "default" while active
                with torch.no_grad():
                    yield model
            else:
                with model.disable_adapter(), torch.no_grad():
                    yield model
        finally:
            if has_reference_adapter(model):
                model.set_adapter("default", inference_mode=False)  # "default" trainable again, "reference" frozen


@contextlib.contextmanager
def no_grad_policy(model):
    """The policy (adapters on) in eval mode with no grad: for the KL rows, whose z0 is detached."""
    with eval_mode(model), torch.no_grad():
        yield model
