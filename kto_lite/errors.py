"""kto_lite's exceptions: one base for a mistake the user can fix, raised by the library anywhere.

Every command maps `UserError` (and a missing or already existing file) to exit code 2 with its
message, and any other exception to exit code 1 (`kto_lite.commands.cli.run`). The library never
exits and never prints an error itself: it raises, and the command or the app decides what to show.
"""

from __future__ import annotations

from typing import Any


class UserError(ValueError):
    """Something the user gave (a flag, a config value, a data row, a model name) cannot be used.

    The message says which and why, and what to do instead; commands exit with code 2.
    """


class UsageError(UserError):
    """A command-line argument or an input that does not fit the command."""


class ConfigError(UserError):
    """A config value or key that cannot be used; the message names the field."""


class DataError(UserError):
    """Data that cannot be used. The message names the file, the 1-based row and the offending value.

    `path`, `row` and `value` are also kept as attributes (None when they do not apply) so that the app
    can point at the problem.
    """

    def __init__(self, message: str, *, path: str | None = None, row: int | None = None, value: Any = None):
        super().__init__(message)
        self.path, self.row, self.value = path, row, value


class MemoryEstimateError(UserError):
    """The model's shape cannot be found or is not one the estimator models; the message says why."""


class UnsupportedModel(UsageError):
    """A model that an export format (GGUF) cannot represent; the message names what is missing."""


class ModelNotFound(UserError):
    """A model (or tokenizer) name that neither a local folder nor the Hugging Face Hub (or its cache, offline)
    provides; the message names the model, says whether the machine is offline and what to do."""
