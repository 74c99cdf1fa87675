"""What every tab shares: the app's settings, the runs folder and what lies in it.

A run folder (docs/design.md, "The run folder") is the contract between the trainer and the app: the tabs find runs by
listing the runs folder, and a run named by the browser is only ever a folder directly under it
(`run_folder`). Files the app did not write itself (uploads, growing feedback files) are copied
under runs/_data before anything trains on them (`stage_file`).
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from kto_lite.data.read import SUFFIXES
from kto_lite.runs import FEEDBACK_FILE

from . import jobs

BASE = "__base__"  # the Chat and Rate tabs' source "base model, no adapter"


@dataclass
class Settings:
    """What `python -m ui` was started with; tests point runs_dir at a temporary folder."""

    runs_dir: Path = field(default_factory=lambda: Path(os.environ.get("KTO_LITE_RUNS", "runs")))
    remote: bool = False  # reachable from other machines (--share, or a --host that is not loopback)
    allow_code: bool = False  # --allow-code: browser users may run code here even when remote

    @property
    def code_allowed(self) -> bool:
        """Settings that run code on this machine (python: judges, trust_remote_code): the machine's own
        user only, unless the owner said otherwise."""
        return not self.remote or self.allow_code


SETTINGS = Settings()


# ---------------------------------------------------------------------- run folders
def run_folder(value: str | None) -> Path | None:
    """A run folder named by a dropdown (which accept typed values): only a run under the runs folder."""
    if not value:
        return None
    path = Path(value)
    runs = SETTINGS.runs_dir.resolve()
    if path.resolve().parent != runs or not (path / "status.json").is_file():
        path = runs / path.name  # a bare run name also works
        if not (path / "status.json").is_file():
            raise gr.Error(f"{value} is not a run folder in {SETTINGS.runs_dir}")
    return SETTINGS.runs_dir / path.name


def adapter_runs() -> list[tuple[str, str]]:
    """(label, value) of the runs with a saved adapter (finished, or stopped: a stop saves it too)."""
    return [(f"{run.name} · {jobs.run_state(run).state}", str(run))
            for run in jobs.list_runs(SETTINGS.runs_dir) if jobs.has_adapter(run)]


# ---------------------------------------------------------------------- what browser users may ask for
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name on the Hugging Face Hub


def allowed_roots() -> list[Path]:
    """Where paths typed in the browser may point when the app is reachable from other machines: the runs
    folder, Gradio's upload folder, and the models the app fetched itself (kto_lite.presets)."""
    from kto_lite.presets import models_cache

    return [SETTINGS.runs_dir.resolve(), Path(gr.utils.get_upload_folder()).resolve(), models_cache().resolve()]


def path_refusal(name: str, value: str | None, *, model: bool = False) -> str:
    """Why a typed path may not be used ("" when it may). Only a remote app without --allow-code confines
    paths; a model may also be a Hub id (owner/name) that is not a local path."""
    value = (value or "").strip()
    if not value or SETTINGS.code_allowed:
        return ""
    path = Path(value).expanduser()
    if model and HUB_ID.match(value) and not path.exists():
        return ""
    resolved = path.resolve()
    if any(resolved.is_relative_to(root) for root in allowed_roots()):
        return ""
    what = "a Hub id (owner/name) or a path" if model else "a path"
    return (f"{name}: {value!r} is refused: the app is reachable from other machines, so {what} typed here must "
            f"lie in the runs folder ({SETTINGS.runs_dir}) or be an upload (the owner can allow any path by "
            "starting it with --allow-code)")


def code_refusal(settings: dict) -> str:
    """Why settings that run code on this machine are refused ("" when they are not): python: judges and
    trust_remote_code, in a remote app started without --allow-code."""
    if SETTINGS.code_allowed:
        return ""
    found = []
    if settings.get("trust_remote_code"):
        found.append("trust_remote_code runs code from the model's repository")
    for name in ("judge",):
        if str(settings.get(name) or "").strip().startswith("python:"):
            found.append(f"{name} {settings[name]!r} runs a Python function")
    if not found:
        return ""
    return ("; ".join(found) + ": refused, the app is reachable from other machines and was started without "
            "--allow-code (code-running settings are for the machine's owner)")


# ---------------------------------------------------------------------- data files
def sample_files() -> dict[str, Path]:
    """Shipped rated answers by the name the Data tab shows: the demo model's samples in each data format,
    then SmolLM2's judged answers (kto_lite.presets.GUIDED_STARTS)."""
    from kto_lite.demo import DEMO_SAMPLES
    from kto_lite.presets import GUIDED_STARTS

    files = {f"{path.name} ({name})": path for name, path in DEMO_SAMPLES.items()}
    smollm2 = GUIDED_STARTS["smollm2"].data
    files[f"{smollm2.name} (SmolLM2-135M-Instruct's answers, judged)"] = smollm2
    return {name: path for name, path in files.items() if path.is_file()}


def heldout_files() -> dict[str, Path]:
    """Shipped prompts with reference answers that no guided start trains on (the Rate tab's judges use them)."""
    from kto_lite.presets import GUIDED_STARTS

    return {f"{start.heldout.name} (held-out questions with answers)": start.heldout
            for start in GUIDED_STARTS.values() if start.heldout.is_file()}


def feedback_path(source: str | None, base_model: str | None = None) -> Path:
    """<run>/feedback.jsonl for a run; runs/_feedback/<model>.jsonl for the base model."""
    if source and source != BASE:
        return run_folder(source) / FEEDBACK_FILE
    name = jobs.slugify(Path((base_model or "").rstrip("/")).name, default="demo")
    return SETTINGS.runs_dir / "_feedback" / f"{name}.jsonl"


def feedback_files() -> dict[str, Path]:
    """Feedback recorded in the Chat and Rate tabs: <run>/feedback.jsonl and runs/_feedback/*.jsonl."""
    from kto_lite.feedback.chat import feedback_counts

    runs = SETTINGS.runs_dir
    found = [run / FEEDBACK_FILE for run in jobs.list_runs(runs)]
    found += sorted((runs / "_feedback").glob("*.jsonl")) if (runs / "_feedback").is_dir() else []
    out = {}
    for path in found:
        if path.is_file():
            counts = feedback_counts(path)
            name = path.parent.name if path.name == FEEDBACK_FILE else f"base model {path.stem}"
            out[f"{name}: {counts['desirable']} liked / {counts['undesirable']} disliked"] = path
    return out


def stage_file(path: str | Path, tag: str = "") -> Path:
    """Copy a file the app does not own (an upload, a growing feedback file) to runs/_data/<sha256><suffix>.

    The name comes from the content, never from the uploaded name, and a run's config.yaml then points
    at a file that does not change or disappear when Gradio clears its upload cache.
    """
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    suffix = path.suffix.lower() if path.suffix.lower() in SUFFIXES else ""
    target = SETTINGS.runs_dir / "_data" / f"{tag}{digest}{suffix}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return target


# ---------------------------------------------------------------------- text shown as Markdown
def markdown_text(text: str) -> str:
    """Plain text shown as Markdown: the characters Markdown would interpret, then HTML's <, > and &
    escaped (in this order: a backslash before the # of an HTML entity would show the entity)."""
    return html.escape(re.sub(r"([\\`*_\[\]#|~])", r"\\\1", text), quote=False)


def error_markdown(error: Exception, path: str | Path, shown: str) -> str:
    """An error as wrapped Markdown (a code block cuts long lines), naming the file as the user knows it."""
    text = str(error).replace(str(Path(path)), shown)
    return "\n".join(f"- {markdown_text(line)}" for line in text.splitlines())
