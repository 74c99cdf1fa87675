"""A model that cannot be found, said in words a user can act on (kto_lite/model.py's loaders use this).

transformers answers a misspelt name, or one not cached on an offline machine, with "We couldn't connect
to 'https://huggingface.co' ...": it names neither the model nor the reason. `explained_load_errors`
turns such errors into `ModelNotFound` (exit 2): which model, whether the machine is offline
(HF_HUB_OFFLINE) and what to do. Any other error passes unchanged.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors

from kto_lite.errors import ModelNotFound

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
EXAMPLE_ID = "Qwen/Qwen2.5-0.5B-Instruct"
OFFLINE_ERRORS = getattr(hub_errors, "OfflineModeIsEnabled", ())  # huggingface_hub >= 0.27


def offline_setting() -> str | None:
    """The environment variable that keeps this process off the Hugging Face Hub ("HF_HUB_OFFLINE=1"), or None."""
    for variable in OFFLINE_VARIABLES:
        if os.environ.get(variable, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{variable}={os.environ[variable]}"
    return "HF_HUB_OFFLINE=1" if hub_constants.HF_HUB_OFFLINE else None


@contextlib.contextmanager
def explained_load_errors(name: str | os.PathLike, revision: str | None = None):
    """Loading `name` inside this block: a model that cannot be found raises ModelNotFound instead."""
    try:
        yield
    except (OSError, ValueError) as e:  # ValueError: a folder that holds no model, an invalid Hub id
        reason = not_found_reason(str(name), revision, e)
        if reason is None:
            raise
        raise ModelNotFound(reason) from e


def not_found_reason(name: str, revision: str | None, error: BaseException) -> str | None:
    """Why `name` could not be loaded and what to do; None when `error` is not about finding the model."""
    causes = _causes(error)

    def caused_by(kind) -> bool:
        return any(isinstance(e, kind) for e in causes)

    path = Path(name).expanduser()
    if path.is_dir() and not isinstance(error, OSError) and (path / "config.json").is_file():
        return None  # a model folder with some other problem
    if path.is_dir():
        why = ("it has no config.json" if not (path / "config.json").is_file()
               else (str(error).strip() or type(error).__name__).splitlines()[0])
        return (f"model {name!r} is a folder, but not one transformers can load ({why}). A model folder holds "
                "config.json and the weights; a trained adapter is given as --adapter (or init_adapter)")
    if not isinstance(error, OSError) and not caused_by(hub_errors.HFValidationError):
        return None
    if (name.startswith((".", "/", "~")) or caused_by(hub_errors.HFValidationError)
            or (isinstance(error, FileNotFoundError) and not caused_by(hub_errors.LocalEntryNotFoundError))):
        return (f"model {name!r}: no such folder or file ({path.resolve()}), and not a Hugging Face Hub id "
                f"(owner/name, e.g. {EXAMPLE_ID}). Check the path")
    if caused_by(hub_errors.GatedRepoError):
        return (f"model {name!r} is gated on the Hugging Face Hub: accept its license on "
                f"https://huggingface.co/{name} with your account, then log in here (`hf auth login`, or HF_TOKEN)")
    if caused_by(hub_errors.RepositoryNotFoundError):
        return (f"model {name!r}: the Hugging Face Hub has no model by that name. Check the spelling (owner/name, "
                f"e.g. {EXAMPLE_ID}); a private model needs `hf auth login` (or HF_TOKEN)")
    if caused_by(hub_errors.RevisionNotFoundError):
        return f"model {name!r} has no revision {revision!r} on the Hugging Face Hub"
    unreachable = (caused_by(hub_errors.LocalEntryNotFoundError) or caused_by(OFFLINE_ERRORS)
                   or "couldn't connect" in str(error).lower())
    offline = offline_setting()
    if unreachable and offline:
        return (f"model {name!r} is not in the Hugging Face cache ({hub_constants.HF_HUB_CACHE}), and this machine "
                f"is offline ({offline}), so it cannot be downloaded. Download it once where there is network "
                f"(`hf download {name}`) and copy the cache here, unset {offline.split('=')[0]}, or give a local "
                "folder")
    if unreachable:
        return (f"model {name!r} could not be downloaded: the Hugging Face Hub did not answer (no network, or a "
                f"proxy in the way?) and it is not in the cache ({hub_constants.HF_HUB_CACHE}). Check the "
                f"connection, download it once where there is network (`hf download {name}`), or give a local "
                "folder")
    if caused_by(hub_errors.EntryNotFoundError):
        return (f"model {name!r} on the Hugging Face Hub is not a transformers model (it has no config.json; a "
                "GGUF repository? name the file: owner/name/file.gguf)")
    return None


def _causes(error: BaseException) -> list[BaseException]:
    """The error and what it was raised from (transformers wraps the Hub's error in an OSError)."""
    chain: list[BaseException] = []
    while error is not None and error not in chain and len(chain) < 8:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain
