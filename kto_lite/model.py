"""The model: a (4-bit) base with LoRA adapters, which doubles as its own reference.

The reference model of KTO is the base with the adapters switched off, so the weights exist once
in memory. `reference_mode` is the one place that switch happens.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from .config import TrainConfig


def resolve_model(name: str | None) -> str:
    """A model name or path; empty means the built-in demo model."""
    if name:
        return name
    from .demo import DEMO_MODEL_DIR

    return str(DEMO_MODEL_DIR)


def compute_dtype() -> torch.dtype:
    """bf16 on GPUs that have it, fp16 on older GPUs (Colab's T4), fp32 on CPU."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def device_map() -> dict:
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}  # one full copy per process
    return {"": "cpu"}


def load_tokenizer(name: str | None, *, revision: str | None = None, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name), revision=revision,
                                              trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:  # Llama-style tokenizers ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def choose_precision(setting: str = "auto") -> str:
    """"bf16", "fp16" or "no" (fp32). Temporary: the compute-capability rule lands with the loading work."""
    if setting != "auto":
        return setting
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(compute_dtype(), "no")


def load_base(name: str | None, *, load_in_4bit: bool = True, precision: str = "auto", revision=None,
              trust_remote_code: bool = False, attn_implementation=None):
    """The base model, 4-bit NF4 with double quantization (QLoRA), or unquantized."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}.get(
        choose_precision(precision), torch.float32)
    quantization = None
    if load_in_4bit:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",  # the QLoRA paper's normal-float type
            bnb_4bit_use_double_quant=True,  # quantize the quantization constants: ~0.4 bit/param saved
            bnb_4bit_compute_dtype=dtype,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model(name), dtype=dtype, quantization_config=quantization, device_map=device_map()
        )
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


@contextlib.contextmanager
def reference_mode(model):
    """Make `model` act as the KTO reference: no grad, eval mode, and the adapters switched off, or, when
    the model holds a frozen "reference" adapter (config.reference: init_adapter), that adapter instead.

    Eval mode also switches off LoRA dropout and gradient checkpointing for these passes (a no-grad
    pass has nothing to recompute). Training mode and the trainable adapter are restored on exit.
    """
    was_training = model.training
    model.eval()
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
        model.train(was_training)


@contextlib.contextmanager
def no_grad_policy(model):
    """The policy (adapters on) in eval mode with no grad: for the KL rows, whose z0 is detached."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
