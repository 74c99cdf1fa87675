"""The train form, generated from TrainConfig's fields; and the way back: form -> config -> command line.

Nothing here lists the fields by hand except which section a field is shown in; a field added to
TrainConfig appears in the "Advanced" accordion without touching the app.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from kto_lite.config import TrainConfig
from kto_lite.errors import ConfigError

# Which section shows a field. Fields not named here go to "advanced"; APP_SET ones are not shown.
SECTIONS = {
    "basic": ("model", "load_in_4bit", "learning_rate", "num_epochs", "max_steps", "batch_size",
              "gradient_accumulation_steps"),
    "kto": ("beta", "desirable_weight", "undesirable_weight", "loss_type"),
    "lora": ("lora_r", "lora_alpha", "lora_dropout", "max_length", "max_prompt_length", "seed"),
    "judged": ("eval_prompts", "judge", "reference_column", "judge_threshold", "eval_samples_per_prompt",
               "keep_best", "early_stopping_patience", "eval_steps"),
}
# The app decides these: the Data tab gives data and its column mapping, a run gets a new folder.
APP_SET = ("data", "columns", "output_dir", "resume_from_checkpoint", "overwrite_output_dir")
TRISTATE = ("auto", "true", "false")  # bool | None fields: auto = None


@dataclass
class FieldSpec:
    name: str
    kind: str  # checkbox | integer | number | text | dropdown | tristate
    default: object  # as the component shows it
    help: str
    choices: tuple = ()
    optional: bool = False  # empty is allowed (None)
    numeric: bool = False  # a text field that also takes a number (desirable_weight: 1.0 or "auto")

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")


def field_specs() -> list[FieldSpec]:
    """One FieldSpec per TrainConfig field the form shows, in the dataclass's order."""
    hints = typing.get_type_hints(TrainConfig)
    specs = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in APP_SET:
            continue
        hint = hints[f.name]
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        optional = type(None) in options
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        choices = tuple(f.metadata.get("choices", ()))
        if choices:
            kind = "dropdown"
        elif set(options) == {bool, type(None)}:
            kind, default = "tristate", "auto" if default is None else str(default).lower()
        elif options[0] is bool and len(options) == 1:
            kind = "checkbox"
        elif set(options) - {type(None)} == {int}:
            kind = "integer"
        elif set(options) - {type(None)} == {float}:
            kind = "number"
        else:  # str, str | None, float | str ("auto"), str | list[str]
            kind, default = "text", _text(default)
        numeric = kind == "text" and bool({int, float} & set(options))
        specs.append(FieldSpec(f.name, kind, default, f.metadata["help"], choices, optional, numeric))
    return specs


def section_of(name: str) -> str:
    return next((section for section, names in SECTIONS.items() if name in names), "advanced")


def _text(value) -> str:
    if value is None or value == {}:
        return ""
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


def placeholders(specs: list[FieldSpec], config: TrainConfig) -> dict[str, str]:
    """What an empty optional number means for `config` (its model's defaults, TrainConfig.resolved):
    shown greyed in the empty field, so an unset field never reads as 0."""
    try:
        resolved = config.resolved()
    except ConfigError:  # e.g. an init_adapter that is not there yet: the field help still says it
        resolved = config
    out = {}
    for spec in specs:
        if spec.optional and spec.kind in ("integer", "number"):
            value = getattr(resolved, spec.name)
            out[spec.name] = "empty: not set" if value is None else f"empty: {value:g}"
    return out


# ---------------------------------------------------------------------- form -> config
def form_to_dict(specs: list[FieldSpec], values: list) -> dict:
    """Component values (in `specs` order) -> TrainConfig keyword values (strings are parsed by TrainConfig)."""
    out = {}
    for spec, value in zip(specs, values, strict=True):
        if spec.kind == "tristate":
            value = None if value in (None, "auto") else value == "true"
        elif spec.kind == "text":
            value = (value or "").strip()
            if not value:
                value = None
            elif spec.numeric and _is_number(value):
                value = float(value)
            elif value.startswith(("[", "{")) or (spec.name == "lora_target_modules" and "," in value):
                value = _yaml(spec, value) if value.startswith(("[", "{")) else [v.strip() for v in value.split(",")]
        elif spec.kind in ("integer", "number"):
            value = _number(spec, value)
        out[spec.name] = value
    return out


def _number(spec: FieldSpec, value):
    """A number field's value: a number, or text (the app shows optional numbers as text boxes, so that an
    unset one is empty, not 0). Empty, and 0 for an optional field (scripts written for the number box), mean
    not set."""
    if isinstance(value, str):
        value = value.strip()
        if value and not _is_number(value):
            raise ConfigError(f"{spec.name}: {value!r} is not a number")
        value = float(value) if value else None
    if spec.optional and not value:
        return None
    if value is None:
        raise ConfigError(f"{spec.name}: a number is needed")
    if spec.kind == "integer" and value != int(value):
        raise ConfigError(f"{spec.name}: {value!r} is not a whole number")
    return int(value) if spec.kind == "integer" else value


def _yaml(spec: FieldSpec, text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{spec.name}: {text!r} is not a valid list or mapping ({e.problem})") from e


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def build_config(specs: list[FieldSpec], values: list, *, data: str | None, output_dir: str | Path,
                 columns: dict[str, str] | None = None, resume: bool = False) -> TrainConfig:
    """The TrainConfig of a new run; raises ConfigError with a readable message on a bad value. `columns`: the
    Data tab's column mapping (file column -> canonical name), the config's `columns` field."""
    settings = form_to_dict(specs, values)
    settings.update(data=data, output_dir=str(output_dir), columns=dict(columns or {}))
    if resume:
        settings["resume_from_checkpoint"] = True
    return TrainConfig.from_dict(settings, source="train form")


def config_to_values(config: TrainConfig, specs: list[FieldSpec]) -> list:
    """The form's component values for `config` (to load a previous run's settings back into the form)."""
    values = []
    for spec in specs:
        value = getattr(config, spec.name)
        if spec.kind == "tristate":
            value = "auto" if value is None else str(value).lower()
        elif spec.kind == "text":
            value = _text(value)
        values.append(value)
    return values


# ---------------------------------------------------------------------- config -> command line
def cli_value(value) -> str:
    """A value as the command line reads it back (YAML, kto_lite.commands.cli.yaml_value): true/false, [a, b], numbers, quoted odd strings."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(value) + "]"
    if isinstance(value, dict):  # columns: a JSON object is a YAML mapping
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same else json.dumps(value)  # JSON strings are YAML strings
    return repr(value)


def train_argv(config: TrainConfig) -> list[str]:
    """`-m kto_lite train --FIELD VALUE ...`: data and output_dir always, other fields when not the default."""
    defaults = TrainConfig().to_dict()
    args = ["-m", "kto_lite", "train"]
    for name, value in config.to_dict().items():
        if name in ("data", "output_dir") or value != defaults[name]:
            args += [f"--{name}", cli_value(value)]
    return args


def command_line(argv: list[str]) -> str:
    """What a user would type in a terminal for `argv` (POSIX shell quoting)."""
    return "python " + shlex.join(argv)


def resume_argv(run: Path) -> list[str]:
    """Resume = the run's own saved config, with --resume_from_checkpoint true (docs/design.md, "The run folder")."""
    run = Path(run)
    return ["-m", "kto_lite", "train", str(run / "config.yaml"), "--output_dir", str(run),
            "--resume_from_checkpoint", "true"]
