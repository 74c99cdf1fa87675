"""The output_dir contract (docs/design.md, "The run folder"): status.json, metrics.jsonl, checkpoints/, and its safety rules.

Nothing a user had is overwritten: a finished or interrupted run is refused unless the config asks
to resume it, or to overwrite it, in which case the old folder is moved aside, not deleted.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import torch
import yaml

from kto_lite.config import TrainConfig
from kto_lite.errors import ConfigError
from kto_lite.files import DiskFullError, atomic_files, atomic_path, remove_partials, write_text
from kto_lite.model import load_base, load_tokenizer, resolve_model

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
    return read_jsonl(Path(output_dir) / "metrics.jsonl")


def read_jsonl(path: str | Path) -> list[dict]:
    """The complete JSON lines of a file the library appends to (metrics, kept answers, samples): a line being
    written right now, or cut short by a kill, is skipped; [] when there is no file."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").split("\n"):  # not splitlines: U+2028 may sit inside a string
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # "" after the last newline, or a half-written line
    return rows


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, TypeError, ValueError):
        return False


BEST_CHECKPOINT = "checkpoints/best.json"  # keep_best: {"step": N, ...}; save_total_limit never deletes that one


def best_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint folder keep_best marked as the best (training/judged.py), None without one."""
    try:
        step = json.loads((Path(output_dir) / BEST_CHECKPOINT).read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return Path(output_dir) / "checkpoints" / f"checkpoint-{step}"


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


# How training loaded the base (config.yaml); whatever reloads a run's base loads it the same way.
LOAD_OPTIONS = ("load_in_4bit", "mixed_precision", "revision", "trust_remote_code", "attn_implementation")


@dataclass(frozen=True)
class RunBase:
    """The base model a run trained on, and how training loaded it: merge, chat, sampling and export reload
    exactly these weights (the same revision, the same remote code, 4-bit or not) through `load`."""

    name: str | None  # as the run gave it: a Hub id, a folder, a .gguf file; None: the built-in demo model
    options: dict  # LOAD_OPTIONS, as training used them

    @classmethod
    def named(cls, name: str | None) -> RunBase:
        """A base model named directly, not by a run: TrainConfig's default load options."""
        defaults = TrainConfig().to_dict()
        return cls(name, {k: defaults[k] for k in LOAD_OPTIONS})

    @property
    def revision(self) -> str | None:
        return self.options["revision"]

    @property
    def model(self) -> str:
        """What `from_pretrained` loads: a Hub id or folder, a GGUF file's converted folder, the demo model."""
        return resolve_model(self.name, revision=self.revision)

    def load(self, *, load_in_4bit: bool | None = None):
        """The base as training loaded it (load_in_4bit None: the run's). Precision and attention kernel are
        this machine's choice (auto): they change rounding, not which weights are loaded."""
        return load_base(self.name, load_in_4bit=self.options["load_in_4bit"] if load_in_4bit is None else load_in_4bit,
                         revision=self.revision, trust_remote_code=self.options["trust_remote_code"])

    def tokenizer(self):
        return load_tokenizer(self.name, revision=self.revision, trust_remote_code=self.options["trust_remote_code"])


def run_base(adapter_dir: str | Path, *, base: str | None = None) -> RunBase:
    """The run's base and load options: config.yaml (`model`, LOAD_OPTIONS), else adapter_config.json's
    base_model_name_or_path and revision (a PEFT adapter made elsewhere), else TrainConfig's defaults.

    base: another model to load instead (e.g. `export --base`); the run's revision names commits of its own
    model, so it is dropped then."""
    settings = run_settings(adapter_dir)
    peft_path = Path(adapter_dir) / "adapter_config.json"
    peft = json.loads(peft_path.read_text()) if peft_path.is_file() else {}
    defaults = TrainConfig().to_dict()
    options = {k: settings[k] if settings.get(k) is not None else defaults[k] for k in LOAD_OPTIONS}
    if not settings:
        options["revision"] = peft.get("revision") or None
    name = settings.get("model") or peft.get("base_model_name_or_path") or None
    if base and base != name:
        name, options = base, {**options, "revision": None}
    return RunBase(name, options)


def adapter_base(adapter_dir: str | Path, *, resolve: bool = True) -> str:
    """The base model an adapter was trained on (`run_base`).

    resolve: what `from_pretrained` loads (a GGUF file's converted folder, the demo model for none);
    False: the name as the run gave it (e.g. the .gguf path itself)."""
    run = run_base(adapter_dir)
    return run.model if resolve else run.name


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    path = Path(adapter_dir)
    if not (path / "adapter_config.json").is_file():
        hint = " (training may still be running, or it stopped before saving)" if path.is_dir() else ""
        raise FileNotFoundError(f"{path}: no adapter here: adapter_config.json is missing{hint}")
    return path


# What a run writes before it has a checkpoint: a folder holding only these may be replaced.
RUN_FILES = ("status.json", "config.yaml", "data_report.json", "metrics.jsonl", "train.log", "tokenizer*",
             "special_tokens_map.json", "chat_template.jinja", "added_tokens.json", "vocab.*", "merges.txt",
             "*.model", "generation_config.json", "judged_samples.jsonl")


def prepare_output_dir(config: TrainConfig) -> Path | None:
    """Create output_dir, or decide what to do with what is there. Returns a checkpoint to resume from.

    A run whose status says `running` but whose process is gone (killed, machine restarted) is a dead run:
    with a checkpoint it is resumed (resume_from_checkpoint true) and otherwise kept; without one it is
    replaced like a failed run, and resuming it says that nothing can be resumed and starts over.
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
    if out.is_dir():
        remove_partials(out)  # what a killed writer left (files.atomic_path): never read, never resumed from
        remove_partials(out / "checkpoints")
    if folder is not None and folder.resolve().parent.parent == out.resolve():
        return folder  # one of this run's own checkpoints: continue the run
    found = checkpoints(out)
    if resume is True and found:
        return found[-1]
    if out.exists() and any(out.iterdir()):
        if _replaceable(out):  # a run that died before its first checkpoint (e.g. while reading its data)
            if resume is True:
                print(f"resume_from_checkpoint: {out} holds no checkpoint (its run ended before the first one): "
                      "nothing to resume; starting the run over in it")
            shutil.rmtree(out)
        elif not config.overwrite_output_dir:
            raise ConfigError(_occupied(out, status, found, resume is True))
        else:
            aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(str(out), str(aside))
            print(f"moved the previous run to {aside}")
    elif resume is True:
        print(f"resume_from_checkpoint: {out} holds no run: nothing to resume; starting a new run")
    out.mkdir(parents=True, exist_ok=True)
    return folder  # another run's checkpoint continues in a new output_dir (its metrics start after its step)


def _occupied(out: Path, status: dict | None, found: list[Path], resume: bool) -> str:
    """Why output_dir cannot be used as it is, and the flags that can."""
    moved = "--overwrite_output_dir true (the old folder is moved aside, not deleted)"
    if status and status.get("status") == "running" and found:  # running, yet its process is gone: a dead run
        return (f"output_dir {out} holds a run whose process ({status.get('pid')}) is gone, killed or lost before it "
                f"finished; its last checkpoint is {found[-1]}. Continue it with --resume_from_checkpoint true, or "
                f"start over with {moved} or another output_dir")
    what = (f"a {status['status']} run" if status.get("status") != "running" else "a run whose process is gone"
            ) if status else "files"
    if resume:
        return (f"resume_from_checkpoint: no checkpoint in {out / 'checkpoints'} to resume from, and {out} holds "
                f"{what} that starting over would replace: use another output_dir, or {moved}")
    return (f"output_dir {out} already holds {what}. Use another output_dir, resume with "
            f"--resume_from_checkpoint true, or {moved}")


def _replaceable(out: Path) -> bool:
    """Only files of a run that never got far enough to save anything worth keeping (no adapter, no checkpoint):
    failed, stopped, or dead (`running` with its process gone)."""
    status = read_status(out) or {}
    ended = status.get("status") in ("failed", "stopped") or (
        status.get("status") == "running" and not pid_alive(status.get("pid")))
    return ended and all((p.is_file() and any(fnmatch(p.name, g) for g in RUN_FILES))
                         or (p.name == "checkpoints" and p.is_dir() and not any(p.iterdir())) for p in out.iterdir())


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
        """Append one line (a line cut short by a kill is skipped by read_metrics, and dropped on resume)."""
        if self.main:
            path = self.path / "metrics.jsonl"
            try:
                with open(path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise DiskFullError(path, f"no space left on the disk of {path} to log step {metrics.get('step')}"
                                        "; free some space, then resume with --resume_from_checkpoint true") from e
                raise

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
        previous = checkpoints(self.path)
        needed = sum(f.stat().st_size for f in previous[-1].iterdir() if f.is_file()) if previous else None
        # written whole into a hidden folder, then renamed: a checkpoint folder is complete or absent
        with atomic_path(self.path / "checkpoints" / f"checkpoint-{step}", folder=True, needed=needed) as folder:
            adapter = whole["adapter"] if whole else None
            model.save_pretrained(folder, selected_adapters=["default"], state_dict=adapter)  # never the base
            scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
            state = {"optimizer": whole["optimizer"] if whole else optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler, "rng": _rng_state()}
            if whole:
                state["adapter"] = adapter
            torch.save(state, folder / "training_state.pt")
            config.save(folder / "config.yaml")
            (folder / "trainer_state.json").write_text(json.dumps({"step": step,
                                                                   "processes": accelerator.num_processes}))
        for old in checkpoints(self.path)[: -config.save_total_limit]:
            if old != best_checkpoint(self.path):  # keep_best's checkpoint stays
                shutil.rmtree(old, ignore_errors=True)

    def save_adapter(self, model, state_dict: dict | None = None) -> None:
        """The trained adapter in output_dir (adapter_model.safetensors + adapter_config.json), each file written
        whole and renamed into place, the config last: a folder whose adapter_config.json is there holds a complete
        adapter (check_adapter_dir). state_dict: FSDP's gathered adapter (None: the model's own)."""
        if not self.main:
            return
        lora = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
        with atomic_files(self.path, last=("adapter_config.json",), needed=lora) as tmp:
            model.save_pretrained(tmp, selected_adapters=["default"], state_dict=state_dict)


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

