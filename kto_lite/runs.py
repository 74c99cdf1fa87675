"""The output_dir contract (DESIGN.md): status.json, metrics.jsonl, checkpoints/, and its safety rules.

Nothing a user had is overwritten: a finished or interrupted run is refused unless the config asks
to resume it, or to overwrite it, in which case the old folder is moved aside, not deleted.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from fnmatch import fnmatch
from pathlib import Path

import torch
import yaml

from kto_lite.config import TrainConfig
from kto_lite.errors import ConfigError
from kto_lite.files import write_text
from kto_lite.model import resolve_model

STATES = ("running", "finished", "stopped", "failed")
FEEDBACK_FILE = "feedback.jsonl"  # rated replies (chat, Rate tab) for the next round, inside a run folder


def read_status(output_dir: str | Path) -> dict | None:
    path = Path(output_dir) / "status.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_metrics(output_dir: str | Path) -> list[dict]:
    """All complete lines of metrics.jsonl (a line being written right now is skipped)."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, TypeError, ValueError):
        return False


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    found = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


# ---------------------------------------------------------------------- what a run folder says
# What a zip (and a Hub upload) holds: the adapter, its tokenizer, and the run's record. Not
# checkpoints/ (optimizer state, several times the adapter's size), not the feedback or any data file.
ZIP_PATTERNS = (
    "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md",  # peft
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.*", "vocab.*",
    "merges.txt", "*.model", "generation_config.json",  # tokenizer
    "config.yaml", "metrics.jsonl", "data_report.json", "status.json",  # the run
)


def run_files(adapter_dir: Path) -> list[Path]:
    """The files of a run that are shipped (ZIP_PATTERNS), sorted."""
    return sorted(p for p in adapter_dir.iterdir() if p.is_file() and any(fnmatch(p.name, g) for g in ZIP_PATTERNS))


def run_settings(adapter_dir: str | Path) -> dict:
    """The run's config.yaml next to the adapter ({} when there is none): model, load_in_4bit, ..."""
    path = Path(adapter_dir) / "config.yaml"
    if not path.is_file():
        return {}
    values = yaml.safe_load(path.read_text())
    return values if isinstance(values, dict) else {}


def adapter_base(adapter_dir: str | Path, *, resolve: bool = True) -> str:
    """The base model an adapter was trained on: config.yaml's `model`, else adapter_config.json's.

    resolve: what `from_pretrained` loads (a GGUF file's converted folder, the demo model for none);
    False: the name as the run gave it (e.g. the .gguf path itself)."""
    base = run_settings(adapter_dir).get("model")
    if not base:
        config = Path(adapter_dir) / "adapter_config.json"
        if config.is_file():
            base = json.loads(config.read_text()).get("base_model_name_or_path")
    return resolve_model(base) if resolve else base


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    path = Path(adapter_dir)
    if not (path / "adapter_config.json").is_file():
        hint = " (training may still be running, or it stopped before saving)" if path.is_dir() else ""
        raise FileNotFoundError(f"{path}: no adapter here: adapter_config.json is missing{hint}")
    return path


# What a run writes before it has a checkpoint: a folder holding only these may be replaced.
RUN_FILES = ("status.json", "config.yaml", "data_report.json", "metrics.jsonl", "train.log", "tokenizer*",
             "special_tokens_map.json", "chat_template.jinja", "added_tokens.json", "vocab.*", "merges.txt",
             "*.model", "generation_config.json")


def prepare_output_dir(config: TrainConfig) -> Path | None:
    """Create output_dir, or decide what to do with what is there. Returns a checkpoint to resume from.

    Called by one process only (the main one under DDP).
    """
    out = Path(config.output_dir)
    resume = config.resume_from_checkpoint
    folder = Path(resume) if resume not in (False, None, "") and resume is not True else None
    if folder is not None and not (folder / "trainer_state.json").is_file():
        raise ConfigError(f"resume_from_checkpoint: {folder} is not a kto_lite checkpoint folder")
    status = read_status(out)
    if status and status.get("status") == "running" and pid_alive(status.get("pid")):
        raise ConfigError(f"output_dir {out} has a run in progress (pid {status.get('pid')}); stop it first")
    if folder is not None and folder.resolve().parent.parent == out.resolve():
        return folder  # one of this run's own checkpoints: continue the run
    if resume is True:
        found = checkpoints(out)
        if not found:
            raise ConfigError(f"resume_from_checkpoint: no checkpoint in {out / 'checkpoints'} to resume from; "
                              "start a new run instead (a run that never saved a checkpoint is simply replaced)")
        return found[-1]
    if out.exists() and any(out.iterdir()):
        if _replaceable(out):  # a run that died before its first checkpoint (e.g. while reading its data)
            shutil.rmtree(out)
        elif not config.overwrite_output_dir:
            what = f"a {status['status']} run" if status else "files"
            raise ConfigError(
                f"output_dir {out} already holds {what}. Use another output_dir, resume with "
                f"--resume_from_checkpoint true, or --overwrite_output_dir true (the old folder is moved aside)"
            )
        else:
            aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(str(out), str(aside))
            print(f"moved the previous run to {aside}")
    out.mkdir(parents=True, exist_ok=True)
    return folder  # another run's checkpoint continues in a new output_dir (its metrics start after its step)


def _replaceable(out: Path) -> bool:
    """Only files of a run that never got far enough to save anything worth keeping (no adapter, no checkpoint)."""
    status = read_status(out)
    return bool(status) and status.get("status") in ("failed", "stopped") and all(
        p.is_file() and any(fnmatch(p.name, g) for g in RUN_FILES) for p in out.iterdir())


class RunDir:
    """Writes the files of a run. Only the main process writes; the others get no-ops."""

    def __init__(self, path: str | Path, *, main: bool = True):
        self.path, self.main = Path(path), main
        self._status: dict = {}

    def status(self, state: str, **fields) -> None:
        assert state in STATES, state
        self._status.update(fields, status=state, pid=os.getpid(), updated=time.time())
        if self.main:
            write_text(self.path / "status.json", json.dumps(self._status, indent=1))

    def log(self, metrics: dict) -> None:
        if self.main:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """On resume: forget lines logged after the checkpoint, they will be logged again."""
        if self.main:
            rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= after_step]
            write_text(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    def save_checkpoint(self, step: int, model, optimizer, scheduler, accelerator, config: TrainConfig,
                        whole: dict | None = None) -> None:
        """Adapter, optimizer, schedule, loss scaler, RNG and the run's config, under checkpoints/checkpoint-N.

        whole: an FSDP run's adapter and optimizer state gathered from the shards (train.gathered_training_state);
        the adapter is also kept by parameter name, so that each process can take its shards back."""
        if not self.main:
            return
        folder = self.path / "checkpoints" / f"checkpoint-{step}"
        adapter = whole["adapter"] if whole else None
        model.save_pretrained(folder, selected_adapters=["default"], state_dict=adapter)  # never the base: it is fixed
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        state = {"optimizer": whole["optimizer"] if whole else optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler, "rng": _rng_state()}
        if whole:
            state["adapter"] = adapter
        torch.save(state, folder / "training_state.pt")
        config.save(folder / "config.yaml")
        (folder / "trainer_state.json").write_text(json.dumps({"step": step, "processes": accelerator.num_processes}))
        for old in checkpoints(self.path)[: -config.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)


# Fields that may change between a checkpoint and its resume: they do not change what is computed.
RESUME_MAY_CHANGE = {"output_dir", "resume_from_checkpoint", "overwrite_output_dir", "logging_steps", "eval_steps",
                     "save_steps", "save_total_limit", "report_to", "push_to_hub", "hub_private", "eval_data",
                     "attn_implementation", "padding_free", "share_prompts"}


def check_resumable(folder: Path, config: TrainConfig) -> None:
    """Refuse to resume with settings that would make a different run than the one checkpointed."""
    saved_path = folder / "config.yaml"
    if not saved_path.is_file():
        return  # a checkpoint from before config snapshots: nothing to compare
    saved = TrainConfig.load(saved_path).to_dict()
    now = config.to_dict()
    changed = [f"{k} (checkpoint: {saved[k]!r}, now: {now[k]!r})" for k in now
               if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k]]
    if changed:
        raise ConfigError(f"cannot resume from {folder}: these settings differ from the checkpoint's: "
                          + "; ".join(changed) + ". Resume with the run's own config.yaml, or start a new run.")


def load_checkpoint(folder: Path, model, optimizer, scheduler, accelerator, config: TrainConfig, load_state) -> int:
    """Restore adapter weights, optimizer, schedule, loss scaler and RNG from a checkpoint; returns its step.

    load_state(model, optimizer, folder, state): how this launch takes the adapter and optimizer state back
    (training/fsdp.py: from the adapter file, or each process its shards of the gathered state)."""
    check_resumable(folder, config)
    trainer_state = json.loads((folder / "trainer_state.json").read_text())
    processes = trainer_state.get("processes", accelerator.num_processes)  # older checkpoints: not recorded
    if processes != accelerator.num_processes:
        launch = f"torchrun --nproc_per_node {processes} ..." if processes > 1 else "a single process"
        raise ConfigError(f"cannot resume from {folder}: it was written by a launch of {processes} process(es), this "
                          f"one has {accelerator.num_processes}, and the step plan deals micro-batches to processes. "
                          f"Resume with {launch}.")
    state = torch.load(folder / "training_state.pt", weights_only=False)
    load_state(model, optimizer, folder, state)
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return trainer_state["step"]


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

