"""`python -m kto_lite train [CONFIG.yaml] [--FIELD VALUE ...]`: train LoRA adapters with KTO.

A training step, from the command line to the loss: this file (flags -> TrainConfig) ->
kto_lite/training/recipe.py (`train`: setup, `Recipe.train_step`, the loop) -> kto_lite/training/loss.py
(`kto_loss`).

A config that cannot be used (an unknown field or flag, a value of the wrong type, a number out of range,
or a setting refused when training starts) exits 2 with one message naming the field, before any work. When
output_dir is named (in the YAML file or as a flag), output_dir/status.json then says "failed" with that
message, as for any failed run (the app and scripts read it); nothing else is written, and a folder that
holds another run's files is left as it is.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import yaml

from kto_lite.commands import cli
from kto_lite.config import TrainConfig
from kto_lite.errors import UsageError, UserError
from kto_lite.runs import RunDir, read_status
from kto_lite.training.recipe import train

CONFIG_PHASE = "checking config"  # status.json's phase when the config itself is refused


def train_parser() -> cli.Parser:
    parser = cli.Parser("train", "Train LoRA adapters with KTO. Every config field is also a flag; flags "
                        "override the YAML file. With nothing given: the built-in demo model on its sample data.")
    parser.add_argument("config", nargs="?", help="a YAML file of config fields (recipes/*.yaml)")
    parser.add_config_fields()
    return parser


def train_config(argv: list[str]) -> TrainConfig:
    """`train`'s arguments -> TrainConfig: a YAML file (optional), then any config field as a flag on top."""
    args = train_parser().parse_args(argv)
    return TrainConfig.load(args.config, cli.config_overrides(args))


def named_output_dir(argv: list[str]) -> str | None:
    """output_dir as a flag or the YAML file names it, read without checking anything else; None when neither
    names it (the default is not written to for a config that was refused)."""
    parser = train_parser()
    parser.error = _quiet_error  # the arguments were read once already, and any problem printed
    try:
        args = parser.parse_known_args(argv)[0]  # an unknown flag does not hide --output_dir
    except UsageError:
        return None
    value = vars(args).get("output_dir")
    if value is None and args.config:
        with contextlib.suppress(OSError, yaml.YAMLError, AttributeError):
            value = (yaml.safe_load(Path(args.config).read_text()) or {}).get("output_dir")
    return value if isinstance(value, str) and value.strip() else None


def record_refusal(output_dir: str | None, error: Exception) -> None:
    """status.json "failed" with the message, in a folder that is new, empty, or holds only an earlier refusal's
    status.json. A status this process wrote (training had taken the folder) already says what happened."""
    if output_dir is None:
        return
    out = Path(output_dir)
    status = read_status(out)
    if status and (status.get("pid") == os.getpid() or status.get("status") in ("running", "finished")):
        return
    if out.exists() and (not out.is_dir() or any(p.name != "status.json" for p in out.iterdir())):
        return  # another run's files: not touched
    with contextlib.suppress(OSError):  # the message still reaches the terminal
        out.mkdir(parents=True, exist_ok=True)
        RunDir(out).status("failed", phase=CONFIG_PHASE, step=0, message=f"{type(error).__name__}: {error}")


def _quiet_error(message: str):
    raise UsageError(message)


def main(argv: list[str]) -> int:
    def body() -> int:
        try:
            train(train_config(argv))
        except cli.UsageExit as e:  # a flag that cannot be parsed: printed already
            record_refusal(named_output_dir(argv), UsageError(e.message))
            return cli.EXIT_USAGE
        except UserError as e:
            record_refusal(named_output_dir(argv), e)
            raise
        return 0

    return cli.run(body)
