"""TrainConfig: every setting of a run, one dataclass.

YAML keys, `--field value` CLI flags and the app's form fields are all generated from the fields
below, so a name is defined exactly once. Each field carries one line of help (`metadata["help"]`).
Unknown keys are rejected with a did-you-mean; values are type-checked and cross-checked on load.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kto_lite.demo import DEMO_MODEL_DIR, DEMO_SAMPLES, DEMO_SETTINGS
from kto_lite.errors import ConfigError

LOSS_TYPES = ("kto", "apo_zero_unpaired")
OPTIMIZERS = ("auto", "paged_adamw_8bit", "adamw_8bit", "adamw_torch")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
PRECISIONS = ("auto", "bf16", "fp16", "no")
REFERENCES = ("base", "init_adapter")
TRACKERS = ("none", "tensorboard", "wandb")
KL_PAIRINGS = ("per_epoch", "fixed")

# Defaults of the fields left empty, derived in `TrainConfig.resolved` from what the user did set.
# LoRA KTO on a real pretrained chat model: chosen by the grid in benchmarks/defaults_grid.py
# (docs/defaults.md). Held-out accuracy rose with the rate up to 5e-4, but from 2e-4 to 5e-4 by only
# 0.05 while the policy's drift from the reference (the reward margin) more than doubled: 2e-4 is the
# knee. beta 0.3 did no better than 0.1. The built-in demo model has its own (DEMO_SETTINGS).
DEFAULT_LEARNING_RATE = 2e-4
DEFAULT_BETA = 0.1
DEFAULT_NUM_EPOCHS = 1
DEFAULT_WARMUP_RATIO = 0.1  # with a decaying schedule; none with "constant"


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- what to train on ---
    model: str | None = _f(
        None, "Hub id, local folder or .gguf file of the base model. Empty: the built-in demo model."
    )
    data: str | None = _f(None, "Labeled data file (.jsonl/.json/.csv/.parquet) or saved dataset folder.")
    output_dir: str = _f("runs/kto", "Where the adapter, metrics.jsonl, checkpoints and status.json go.")
    eval_data: str | None = _f(None, "Held-out data file, evaluated with the same metrics (eval_ prefix).")
    eval_fraction: float = _f(0.0, "Fraction of `data` held out for evaluation when no eval_data is given.")

    # --- model and adapters ---
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the model. Empty: the default branch.")
    trust_remote_code: bool = _f(False, "Run model code shipped in the model's repository (only for repos you trust).")
    attn_implementation: str | None = _f(
        None, "Attention kernel: sdpa, eager or flash_attention_2. Empty: flash-attention when installed, else sdpa."
    )
    load_in_4bit: bool = _f(True, "Load the base in 4-bit NF4 (QLoRA). False: unquantized (more memory).")
    mixed_precision: str = _f(
        "auto", "auto: bf16 on GPUs with compute capability >= 8.0, fp16 + loss scaling on older GPUs, "
        "fp32 on CPU.", choices=PRECISIONS,
    )
    init_adapter: str | None = _f(
        None, "Start from this trained adapter (a run folder) instead of fresh LoRA weights: the next round."
    )
    reference: str = _f(
        "base", "The KTO reference: 'base' (adapters off) or 'init_adapter' (the frozen starting adapter).",
        choices=REFERENCES,
    )
    lora_r: int = _f(16, "LoRA rank. Higher: more capacity, more memory; 8-64 is typical.")
    lora_alpha: int | None = _f(None, "LoRA scale numerator (scale = alpha / r). Empty: 2 * lora_r.")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input during training.")
    lora_target_modules: str | list[str] = _f(
        "all-linear", "Modules that get adapters: 'all-linear' or a list such as [q_proj, v_proj]."
    )
    gradient_checkpointing: bool = _f(True, "Recompute activations in backward: much less memory, ~30% slower.")
    use_chat_template: bool | None = _f(
        None, "Wrap plain-text prompts in the tokenizer's chat template. Empty: yes when it has one."
    )

    # --- the KTO loss (paper eq. 7-8) ---
    beta: float | None = _f(
        None, f"KTO beta: how far the policy may move from the reference. Empty: {DEFAULT_BETA} (demo model: its own)."
    )
    desirable_weight: float | str = _f(
        "auto", "lambda_D, weight of desirable examples. 'auto': the paper's rule (eq. 8) from the label counts, "
        "1.0 when they are balanced (measured: docs/defaults.md)."
    )
    undesirable_weight: float | str = _f("auto", "lambda_U, weight of undesirable examples; 'auto' as desirable_weight.")
    loss_type: str = _f("kto", "'kto' (paper) or 'apo_zero_unpaired' (no z0 reference point).", choices=LOSS_TYPES)
    kl_pairing: str = _f(
        "per_epoch", "per_epoch: new KL pairs every epoch (one reference pass over the KL rows per epoch, as the "
        "paper's authors do); fixed: epoch 1's pairs throughout (that pass is paid once).", choices=KL_PAIRINGS,
    )
    kl_over_step: bool = _f(
        False, "Estimate z0 over all micro-batches of an optimizer step, not each one: steadier at batch_size 1-2."
    )

    # --- optimisation ---
    learning_rate: float | None = _f(
        None, f"Peak learning rate. Empty: {DEFAULT_LEARNING_RATE:g} for LoRA (measured; demo model: its own)."
    )
    lr_scheduler_type: str = _f("cosine", "Learning-rate schedule after warmup.", choices=SCHEDULERS)
    warmup_ratio: float | None = _f(
        None, f"Fraction of steps warming the learning rate up from 0. Empty: {DEFAULT_WARMUP_RATIO} "
        "(0 with a constant schedule)."
    )
    weight_decay: float = _f(0.0, "AdamW weight decay on the LoRA weights.")
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this value (0: no clipping).")
    optimizer: str = _f(
        "auto", "'auto': paged 8-bit AdamW on GPU, AdamW on CPU; or name one.", choices=OPTIMIZERS
    )
    num_epochs: float | None = _f(
        None, f"Passes over the data; the paper's authors prefer more epochs to a higher rate. Empty: "
        f"{DEFAULT_NUM_EPOCHS} (demo model: its own)."
    )
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (overrides num_epochs).")
    batch_size: int = _f(4, "Examples per device per forward pass. z0 is estimated on each batch: >= 4 helps.")
    gradient_accumulation_steps: int = _f(4, "Micro-batches per optimizer step; effective batch 16-128 is best.")
    max_length: int = _f(1024, "Longest prompt+completion in tokens; the completion tail is cut beyond it.")
    max_prompt_length: int | None = _f(
        None, "Longest prompt in tokens; longer prompts keep their end (latest turns). Empty: max_length / 2."
    )
    group_by_length: bool = _f(True, "Batch examples of similar length together (less padding, same mix).")
    padding_free: bool | None = _f(
        None, "Pack a micro-batch's rows into one sequence, no padding computed. Empty: when the model supports it."
    )
    share_prompts: bool | None = _f(
        None, "Score an example and its KL row after one copy of their common prompt (same numbers, less work). "
        "Empty: when the model supports it and the prompts are long enough to gain (docs/performance.md)."
    )
    fsdp: bool = _f(
        False, "Shard the 4-bit base, LoRA weights, gradients and optimizer state across the processes of a "
        "multi-process launch (torchrun), for a model that does not fit one GPU (docs/multi_gpu.md)."
    )
    precompute_reference: bool = _f(True, "Compute reference log-probs once before training and cache them.")
    seed: int = _f(42, "Seed for shuffling, KL pairing, LoRA init and dropout.")

    # --- logging, saving, resuming ---
    logging_steps: int = _f(1, "Write a metrics.jsonl line every this many optimizer steps.")
    eval_steps: int = _f(50, "Evaluate every this many optimizer steps (and at the end) when there is eval data.")
    save_steps: int = _f(100, "Save a resumable checkpoint every this many optimizer steps (0: only at the end).")
    save_total_limit: int = _f(2, "Keep at most this many checkpoints in output_dir/checkpoints.")
    resume_from_checkpoint: bool | str = _f(
        False, "true: resume from the latest checkpoint in output_dir; or a checkpoint folder (another run's "
        "continues in output_dir, which must be new)."
    )
    overwrite_output_dir: bool = _f(False, "Allow replacing a finished run in output_dir (off: refuse).")
    report_to: str = _f("none", "Also log metrics to 'tensorboard' or 'wandb' (accelerate's trackers).",
                        choices=TRACKERS)
    push_to_hub: str | None = _f(None, "Upload the adapter and its model card to this Hub repo id at the end.")
    hub_private: bool = _f(True, "Create the Hub repo as private.")

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), _hints()[f.name]))
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name}: {getattr(self, f.name)!r} is not one of {', '.join(choices)}")
        positive = ["lora_r", "lora_alpha", "beta", "batch_size", "gradient_accumulation_steps",
                    "max_length", "max_prompt_length", "logging_steps", "eval_steps", "num_epochs"]
        for name in positive:  # None: derived later (`resolved`)
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            if value != "auto" and value <= 0:
                raise ConfigError(f"{name} must be > 0 or 'auto', got {value!r}")
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length "
                f"({self.max_length}), or no completion token would be left"
            )
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate is not None and not 0 < self.learning_rate <= 1e-2:
            raise ConfigError(f"learning_rate must be in (0, 1e-2], got {self.learning_rate}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"max_steps must be > 0 (or empty to use num_epochs), got {self.max_steps}")
        if self.save_steps < 0 or self.save_total_limit < 1:
            raise ConfigError("save_steps must be >= 0 and save_total_limit >= 1")
        if self.reference == "init_adapter" and not self.init_adapter:
            raise ConfigError("reference: 'init_adapter' needs init_adapter (the adapter to start from)")
        if self.fsdp and self.optimizer not in ("auto", "adamw_torch"):
            raise ConfigError(f"fsdp: optimizer {self.optimizer} cannot step sharded weights; use adamw_torch "
                              "(FSDP already splits the optimizer state across the GPUs)")

    # ------------------------------------------------------------------ derived defaults
    def resolved(self) -> TrainConfig:
        """A copy with every empty derived field filled from what was set (DESIGN: a default never
        contradicts a value the user gave). The run's config.yaml records these values."""

        c = dataclasses.replace(self)  # runs __post_init__ again: still valid
        if c.data is None and c.model is None:
            c.data = str(DEMO_SAMPLES["kto"])  # `train` with no arguments: the demo on its sample feedback
        is_demo = c.model is None or Path(c.model).resolve() == DEMO_MODEL_DIR.resolve()
        derived = dict(DEMO_SETTINGS) if is_demo else {"learning_rate": DEFAULT_LEARNING_RATE, "beta": DEFAULT_BETA,
                                                       "num_epochs": DEFAULT_NUM_EPOCHS}
        for name, value in derived.items():
            if getattr(c, name) is None:
                setattr(c, name, value)
        if c.init_adapter:
            _adopt_adapter_shape(c)
        if c.max_prompt_length is None:
            c.max_prompt_length = max(1, c.max_length // 2)
        if c.lora_alpha is None:
            c.lora_alpha = 2 * c.lora_r
        if c.warmup_ratio is None:
            c.warmup_ratio = 0.0 if c.lr_scheduler_type == "constant" else DEFAULT_WARMUP_RATIO
        c.validate()
        return c

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; known fields: {', '.join(sorted(known))}"
                raise ConfigError(f"{source}: unknown field '{key}'{hint}")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
        """Read a YAML file (or nothing: all defaults), then apply overrides (e.g. command-line flags) on top."""
        values: dict = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            try:
                values = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from e
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: expected a mapping of field: value, got {type(values).__name__}")
        values.update(overrides or {})
        return cls.from_dict(values, source=str(path) if path else "config")


def _adopt_adapter_shape(c: TrainConfig) -> None:
    """Continuing from init_adapter keeps that adapter's shape (rank, alpha, target modules): a value set
    to something else is an error, an unset one takes the adapter's."""
    import json

    path = Path(c.init_adapter) / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"init_adapter: {c.init_adapter} holds no adapter (adapter_config.json is missing)")
    adapter = json.loads(path.read_text())
    shape = {"lora_r": adapter.get("r"), "lora_alpha": adapter.get("lora_alpha"),
             "lora_target_modules": adapter.get("target_modules")}
    default = TrainConfig.__dataclass_fields__
    for name, value in shape.items():
        given, unset = getattr(c, name), _default_of(default[name])
        if isinstance(value, list | set | tuple):
            value = sorted(value)
            given = sorted(given) if isinstance(given, list) else given
        if given not in (None, unset, value) and not (name == "lora_target_modules" and given == "all-linear"):
            raise ConfigError(f"{name}: {getattr(c, name)!r} differs from init_adapter's {value!r}; an adapter keeps "
                              "its shape when training continues (leave the field empty)")
        setattr(c, name, value)


def _default_of(f):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def resolve_optimizer(name: str, device: str | None = None, fsdp: bool = False) -> str:
    """The one home of the 'auto' rule: paged 8-bit AdamW on a GPU (less memory), torch's AdamW on CPU and
    under FSDP (bitsandbytes' optimizers cannot step sharded weights; FSDP already splits the state)."""
    if name != "auto":
        return name
    if fsdp:
        return "adamw_torch"
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "paged_adamw_8bit" if device == "cuda" else "adamw_torch"


def field_help() -> dict[str, str]:
    return {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}


# ---------------------------------------------------------------------- type coercion
_HINTS: dict | None = None


def _hints() -> dict:
    global _HINTS
    if _HINTS is None:
        _HINTS = typing.get_type_hints(TrainConfig)
    return _HINTS


def _coerce(name: str, value, hint):
    """Check `value` against the field's type; accept strings from the CLI/UI ("1e-5", "true", "auto")."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{name} cannot be empty")
    if isinstance(value, str) and str not in options and typing.get_origin(options[0]) is not list:
        parsed = yaml.safe_load(value) if value.strip() else None
        if isinstance(parsed, str):  # YAML 1.1 reads "2e-5" as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        if parsed is not None and not isinstance(parsed, str):
            return _coerce(name, parsed, hint)
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is int and isinstance(value, float) and value.is_integer() and float not in options:
            return int(value)
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            if name.endswith("_weight") and value != "auto":
                continue
            return value
        if typing.get_origin(option) is list and isinstance(value, list | tuple):
            return [str(v) for v in value]
    wanted = " or ".join("list" if typing.get_origin(o) is list else getattr(o, "__name__", str(o))
                         for o in options if o is not type(None))
    if type(None) in options:
        wanted += " (or empty)"
    if name.endswith("_weight"):
        wanted = "a number or 'auto'"
    raise ConfigError(f"{name}: expected {wanted}, got {value!r}")


def markdown_table() -> str:
    """The README's table of fields (tests/test_readme.py keeps README in sync with this)."""
    defaults = TrainConfig().to_dict()
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for name, help in field_help().items():
        value = defaults[name]
        shown = "empty" if value is None else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        rows.append(f"| `{name}` | `{shown}` | {help} |")
    return "\n".join(rows)
