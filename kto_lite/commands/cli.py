"""The command line's shared conventions, used by every `python -m kto_lite COMMAND`.

- Flags are spelled like the config fields: `--max_length 16` (the dashed `--max-length` is accepted
  too), and a flag named after a TrainConfig field takes its help text from the field.
- Values are read as YAML scalars (`true`, `1e-4`, `[q_proj, v_proj]`), then checked by TrainConfig.
- `--column NAME=CANONICAL` (repeatable) is the one-column spelling of the `columns` field, wherever
  `--columns` is a flag.
- A usage error prints what is wrong first (an unknown flag: the closest known one), then one usage
  line; usage and input errors exit 2, failures while running exit 1.

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

from kto_lite.config import TrainConfig, column_map, column_pair
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


class UsageExit(SystemExit):
    """A command line that cannot be parsed: exit 2 once the message is printed; `message` keeps what was wrong
    (for `train`'s status.json)."""

    def __init__(self, message: str):
        super().__init__(EXIT_USAGE)
        self.message = message


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
        """TrainConfig fields as flags (all of them by default). Unset flags stay out of the namespace.

        A flag the command already has keeps the command's meaning (`loop --judge` judges its samples; the
        config field `judge` is the judged evaluation inside one training run)."""

        group = self.add_argument_group("config fields (YAML keys; see README, Configuration)")
        added = set()
        for f in dataclasses.fields(TrainConfig):
            if f"--{f.name}" in self._option_string_actions:
                continue
            if (names is None or f.name in names) and f.name not in exclude:
                flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
                default = "empty" if f.default is None else f.default
                if f.default is dataclasses.MISSING:
                    default = f.default_factory()
                text = f"{f.metadata['help']} (default: {default})".replace("%", "%%")  # argparse %-formats help
                group.add_argument(*flags, dest=f.name, type=yaml_value, default=argparse.SUPPRESS,
                                   metavar="VALUE", help=text)
                added.add(f.name)
                if f.name == "columns":
                    group.add_argument("--column", dest="column", action="append", default=argparse.SUPPRESS,
                                       metavar="NAME=CANONICAL", help="one entry of columns: read the file's column "
                                       "NAME as CANONICAL, e.g. --column question=prompt; repeatable")
        self.set_defaults(config_fields=added | (self.get_default("config_fields") or set()))  # config_overrides

    def error(self, message: str):
        """What is wrong first (an unknown flag gets the closest known spelling), then one usage line; exit 2."""
        unknown = re.search(r"unrecognized arguments: (.*)", message)
        if unknown:
            known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
            hints = []
            for arg in unknown.group(1).split():
                if arg.startswith("--"):
                    close = difflib.get_close_matches(arg.split("=")[0], known, n=1)
                    hints.append(f"{arg}: did you mean {close[0]}?" if close else f"{arg}: no such flag")
            if hints:  # the value after an unknown flag is unrecognized too: the hints say all there is
                message = "\n  ".join(hints)
        self._print_message(f"{self.prog}: error: {message}\n{self.short_usage()}\n", sys.stderr)
        raise UsageExit(message)

    def short_usage(self) -> str:
        """One line: the command, its positional arguments and required flags (argparse's full usage
        lists every flag, over thirty lines for `train`)."""
        shown = [a for a in self._actions if not a.option_strings or a.required]
        formatter = self._get_formatter()
        formatter.add_usage(None, shown, [])
        usage = " ".join(formatter.format_help().split())
        return f"{usage} [options]   (--help lists them)"


def config_overrides(args: argparse.Namespace) -> dict:
    """The TrainConfig fields given on the command line (flags added by `add_config_fields`; a command's own
    flag of the same name is not one)."""

    names = getattr(args, "config_fields", set())
    overrides = {k: v for k, v in vars(args).items() if k in names}
    if getattr(args, "column", None):  # --column NAME=CANONICAL entries, on top of --columns
        pairs = dict(column_pair(item, "--column") for item in args.column)
        overrides["columns"] = {**column_map("--columns", overrides.get("columns")), **pairs}
    return overrides


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
