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
# The column names the data formats read (docs/data.md); `columns` maps a file's own names onto them.
CANONICAL_COLUMNS = ("prompt", "completion", "label", "kto_tag", "messages", "chosen", "rejected")

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
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- what to train on ---
    model: str | None = _f(
        None, "Hub id, local folder or .gguf file of the base model. Empty: the built-in demo model."
    )
    data: str | None = _f(None, "Labeled data file (.jsonl/.json/.csv/.parquet) or saved dataset folder.")
    columns: dict[str, str] = _f(
        {}, "Read the file's columns under other names, e.g. {question: prompt, answer: completion, rating: label} "
        "(flag: --column question=prompt, repeatable). Applies to data and eval_data."
    )
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
    humanline: bool = _f(
        False, "Humanline KTO (Liu et al. 2025): clamp each token's log-ratio to [log_epsilon_P, log_epsilon_R] "
        "and sync the reference to the policy every humanline_sync_steps (docs/methods.md; measured there)."
    )
    log_epsilon_P: float = _f(-1.0, "Humanline: lower bound of a token's log(pi / pi_ref); below it the token "
                                    "gets no gradient.")
    log_epsilon_R: float = _f(1.5, "Humanline: upper bound of a token's log(pi / pi_ref); above it the token "
                                   "gets no gradient.")
    humanline_sync_steps: int = _f(1, "Humanline: copy the policy's adapter into the reference every this many "
                                      "optimizer steps.")

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
    eval_steps: int = _f(50, "Evaluate every this many optimizer steps (and at the end) when there is eval data or "
                             "a judge.")
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

    # --- judged evaluation: the policy's own sampled answers to held-out prompts (docs/loop.md) ---
    eval_prompts: str | None = _f(
        None, "Held-out prompts (any data format: a prompt or messages column, plus the judge's reference "
        "column) whose sampled answers are judged at step 0, every eval_steps and at the end."
    )
    judge: str | None = _f(
        None, "Judge of eval_prompts' answers: exact, contains, number, regex:PATTERN, python:MODULE:FUNCTION or "
        "python:FILE.py:FUNCTION (docs/loop.md)."
    )
    reference_column: str | None = _f(
        None, "eval_prompts' column with the reference answer. Empty: the first of answer, reference, target, "
        "solution."
    )
    judge_threshold: float | None = _f(None, "A python judge that returns a score: score >= this is a success.")
    eval_samples_per_prompt: int = _f(
        4, "Answers sampled per held-out prompt at each judged evaluation (the interval is clustered by prompt: "
        "more prompts narrow it more than more samples)."
    )
    eval_temperature: float = _f(0.7, "Sampling temperature of the judged evaluation (0: greedy).")
    eval_top_p: float = _f(0.9, "Nucleus sampling of the judged evaluation (1: off).")
    eval_max_new_tokens: int = _f(256, "Longest sampled answer of the judged evaluation, in tokens.")
    keep_best: bool = _f(
        False, "The run's adapter is the checkpoint with the best judged success, not the last one (which stays "
        "in checkpoints/)."
    )
    early_stopping_patience: int | None = _f(
        None, "Stop after this many judged evaluations in a row without a better judged success. Empty: never."
    )

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
                    "max_length", "max_prompt_length", "logging_steps", "eval_steps", "num_epochs",
                    "humanline_sync_steps"]  # checked even when unused: a bad value is refused, never kept
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
        for name in ("save_steps", "weight_decay", "max_grad_norm", "seed"):  # 0 means off (seed: a seed)
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.save_total_limit < 1:
            raise ConfigError(f"save_total_limit must be >= 1, got {self.save_total_limit}")
        if self.reference == "init_adapter" and not self.init_adapter:
            raise ConfigError("reference: 'init_adapter' needs init_adapter (the adapter to start from)")
        if self.fsdp and self.optimizer not in ("auto", "adamw_torch"):
            raise ConfigError(f"fsdp: optimizer {self.optimizer} cannot step sharded weights; use adamw_torch "
                              "(FSDP already splits the optimizer state across the GPUs)")
        _check_judged_evaluation(self)
        _check_humanline(self)

    # ------------------------------------------------------------------ derived defaults
    def resolved(self) -> TrainConfig:
        """A copy with every empty derived field filled from what was set (docs/design.md, "Config fields": a
        default never contradicts a value the user gave). The run's config.yaml records these values."""

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


def _check_judged_evaluation(c: TrainConfig) -> None:
    """The judged evaluation's fields, checked together (the prompt file and the judge spec are checked against
    each other when training starts, before the model loads: training/judged.py)."""
    if bool(c.eval_prompts) != bool(c.judge):
        given, missing = ("eval_prompts", "judge") if c.eval_prompts else ("judge", "eval_prompts")
        raise ConfigError(f"{given} needs {missing}: the judged evaluation samples answers to eval_prompts and "
                          "judges them (docs/loop.md)")
    needs_judge = [name for name in ("reference_column", "judge_threshold", "keep_best", "early_stopping_patience")
                   if getattr(c, name) not in (None, False)]
    if needs_judge and not c.judge:
        raise ConfigError(f"{', '.join(needs_judge)} need a judged evaluation: set eval_prompts and judge")
    for name in ("eval_samples_per_prompt", "eval_max_new_tokens", "early_stopping_patience"):
        if getattr(c, name) is not None and getattr(c, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(c, name)}")
    if c.eval_temperature < 0 or not 0 < c.eval_top_p <= 1:
        raise ConfigError(f"eval_temperature must be >= 0 and eval_top_p in (0, 1], got {c.eval_temperature} and "
                          f"{c.eval_top_p}")
    if c.judge and c.fsdp:
        raise ConfigError("a judged evaluation samples with the whole model, which fsdp shards across the "
                          "processes: evaluate the saved adapter with `python -m kto_lite evaluate` instead")


def _check_humanline(c: TrainConfig) -> None:
    if not c.humanline:
        return
    if not c.log_epsilon_P < 0 < c.log_epsilon_R:
        raise ConfigError(f"humanline: need log_epsilon_P < 0 < log_epsilon_R (a token the policy has not moved "
                          f"has log-ratio 0), got {c.log_epsilon_P} and {c.log_epsilon_R}")
    if c.loss_type != "kto" or c.fsdp or c.kl_over_step:
        raise ConfigError("humanline is implemented for loss_type kto, without fsdp and kl_over_step")
    if c.save_steps % c.humanline_sync_steps:
        raise ConfigError(f"humanline: save_steps ({c.save_steps}) must be a multiple of humanline_sync_steps "
                          f"({c.humanline_sync_steps}), so that a checkpoint's reference is its own policy")


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
    if typing.get_origin(hint) is dict:
        return column_map(name, value)
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


def column_pair(text: str, name: str = "columns") -> tuple[str, str]:
    """"question=prompt" -> ("question", "prompt"): the flag's spelling of one column mapping."""
    column, sep, canonical = str(text).partition("=")
    if not sep or not column.strip() or not canonical.strip():
        raise ConfigError(f"{name}: {text!r} is not NAME=CANONICAL (e.g. question=prompt)")
    return column.strip(), canonical.strip()


def column_map(name: str, value) -> dict[str, str]:
    """A mapping file column -> canonical column name (CANONICAL_COLUMNS), checked.

    Accepts a mapping (YAML), or text: YAML ("{question: prompt}") or NAME=CANONICAL pairs separated by
    commas (the flag's spelling). Empty means no mapping.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        text = value.strip()
        if "=" in text and not text.startswith("{"):
            value = dict(column_pair(pair, name) for pair in text.split(",") if pair.strip())
        else:
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                pass
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a mapping of file column to column name, e.g. "
                          f"{{question: prompt, rating: label}}, got {value!r}")
    mapped: dict[str, str] = {}
    for column, canonical in value.items():
        if canonical not in CANONICAL_COLUMNS:
            close = difflib.get_close_matches(str(canonical), CANONICAL_COLUMNS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{name}: column {column!r} is mapped to {canonical!r}, which is not one of "
                              f"{', '.join(CANONICAL_COLUMNS)}{hint}")
        if canonical in mapped.values():
            first = next(c for c, target in mapped.items() if target == canonical)
            raise ConfigError(f"{name}: columns {first!r} and {column!r} are both mapped to {canonical!r}")
        mapped[str(column)] = canonical
    return mapped


def markdown_table() -> str:
    """The table of fields in docs/config.md (tests/test_readme.py keeps it in sync with this)."""
    defaults = TrainConfig().to_dict()
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for name, help in field_help().items():
        value = defaults[name]
        shown = "empty" if value is None else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        rows.append(f"| `{name}` | `{shown}` | {help} |")
    return "\n".join(rows)
