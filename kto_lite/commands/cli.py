"""The command line's shared conventions, used by every `python -m kto_lite COMMAND`.

- Flags are spelled like the config fields: `--max_length 16` (the dashed `--max-length` is accepted
  too), and a flag named after a TrainConfig field takes its help text from the field.
- Values are read as YAML scalars (`true`, `1e-4`, `[q_proj, v_proj]`), then checked by TrainConfig.
- An unknown flag gets a did-you-mean; usage and input errors exit 2, failures while running exit 1.

argparse (standard library) does the parsing; `Parser` only adds the did-you-mean and the exit codes.
transformers' HfArgumentParser was considered: it cannot type a field that is a number or "auto"
(`desirable_weight`), and it has no YAML-file-plus-overrides layering.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
import traceback
from collections.abc import Callable

import yaml

from kto_lite.config import TrainConfig
from kto_lite.errors import UserError

EXIT_USAGE = 2  # a usage or input error: fix the command or the file
EXIT_FAILURE = 1  # something failed while running


def yaml_value(text: str):
    """A flag's value as YAML reads it ("1e-4" -> 0.0001, "true" -> True, "" -> None)."""
    if text == "":
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "2e-5" as a string
        try:
            return float(value) if re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value) else value
        except ValueError:
            return value
    return value


class Parser(argparse.ArgumentParser):
    """argparse with kto_lite's conventions: underscore flags (dashes accepted), did-you-mean, exit 2."""

    def __init__(self, command: str, description: str, **kwargs):
        super().__init__(prog=f"python -m kto_lite {command}", description=description, allow_abbrev=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def add_flag(self, name: str, *args, **kwargs) -> argparse.Action:
        """`--name` and, for names with underscores, the dashed spelling as an alias."""
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        return self.add_argument(*flags, *args, dest=name, **kwargs)

    def add_config_fields(self, names: list[str] | None = None, *, exclude: tuple[str, ...] = ()) -> None:
        """TrainConfig fields as flags (all of them by default). Unset flags stay out of the namespace."""

        group = self.add_argument_group("config fields (YAML keys; see README, Configuration)")
        for f in dataclasses.fields(TrainConfig):
            if (names is None or f.name in names) and f.name not in exclude:
                flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
                default = "empty" if f.default is None else f.default
                if f.default is dataclasses.MISSING:
                    default = f.default_factory()
                group.add_argument(*flags, dest=f.name, type=yaml_value, default=argparse.SUPPRESS,
                                   metavar="VALUE", help=f"{f.metadata['help']} (default: {default})")

    def error(self, message: str):
        """Unknown flags get the closest known spelling; exit code 2."""
        unknown = re.search(r"unrecognized arguments: (.*)", message)
        if unknown:
            known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
            hints = []
            for arg in unknown.group(1).split():
                if arg.startswith("--"):
                    close = difflib.get_close_matches(arg.split("=")[0], known, n=1)
                    hints.append(f"{arg}: did you mean {close[0]}?" if close else f"{arg}: no such flag")
            if hints:
                message += "\n  " + "\n  ".join(hints)
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def config_overrides(args: argparse.Namespace) -> dict:
    """The TrainConfig fields given on the command line (flags added by `add_config_fields`)."""

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


def run(main: Callable[[], int | None]) -> int:
    """Call a command's body and turn known exceptions into a message and an exit code.

    UserError (kto_lite.errors: usage, config, data, memory estimate), FileNotFoundError, FileExistsError:
    exit 2 (the input is wrong). Any other Exception: exit 1 (something failed while running). Ctrl-C: 130.
    """
    try:
        return int(main() or 0)
    except (UserError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130
    except Exception as e:  # the message is what the user gets; KTO_LITE_DEBUG=1 shows the traceback
        if os.environ.get("KTO_LITE_DEBUG"):
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILURE
