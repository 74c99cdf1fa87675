"""The Hugging Face Hub: a model card for a run, a token check before training, and the upload.

- `write_model_card(run_dir)`: README.md in the run folder, in the Hub's format (YAML metadata:
  base_model, library_name peft, tags, datasets when known; then the training settings, the final
  metrics, the data summary and how to load the adapter with peft, as a GGUF and in Ollama).
- `check_hub_access(repo_id)`: raises ConfigError when no token is available (HF_TOKEN or
  `hf auth login`), so a run can refuse to start instead of failing after hours of training.
- `push_run(run_dir, repo_id, private=True, extra=())`: one commit with the adapter, tokenizer, card,
  config.yaml and metrics (not checkpoints/), plus any exported files; returns the repo's URL.

All through `huggingface_hub`; the endpoint is HF_ENDPOINT when set (tests point it at a local stand-in).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

from kto_lite.errors import ConfigError
from kto_lite.runs import run_files

TAGS = ["kto", "lora", "peft", "kto_lite", "alignment"]
# config.yaml fields worth showing on a card, in this order
CARD_SETTINGS = ("model", "data", "load_in_4bit", "loss_type", "beta", "desirable_weight", "undesirable_weight",
                 "learning_rate", "num_epochs", "max_steps", "batch_size", "gradient_accumulation_steps",
                 "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "max_length", "seed")
CARD_METRICS = ("step", "epoch", "loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    values = yaml.safe_load(path.read_text())
    return values if isinstance(values, dict) else {}


def _last_metrics(path: Path) -> dict:
    """The last line of metrics.jsonl ({} when there is none)."""
    if not path.is_file():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else {}


def hub_id(name: str | None) -> str | None:
    """`name` when it reads as a Hub repo id (owner/name, not a local path), else None."""
    if not name or Path(name).exists() or name.endswith(".gguf") or not _REPO_ID.match(name):
        return None
    return name


# --------------------------------------------------------------------------- the model card


def model_card(run_dir: str | Path, repo_id: str | None = None) -> str:
    """The text of README.md for a run folder."""
    from huggingface_hub import ModelCardData

    run_dir = Path(run_dir)
    settings = _read_yaml(run_dir / "config.yaml")
    base = settings.get("model") or "kto_lite's built-in demo model"
    data = settings.get("data")
    data_card = ModelCardData(base_model=hub_id(settings.get("model")), library_name="peft", tags=TAGS,
                              datasets=[hub_id(data)] if hub_id(data) else None, pipeline_tag="text-generation")
    name = repo_id or run_dir.resolve().name
    parts = [f"---\n{data_card.to_yaml()}\n---\n", f"# {name}\n",
             f"A LoRA adapter for `{base}`, aligned with KTO (Ethayarajh et al., 2024: binary desirable / "
             "undesirable feedback) by kto_lite"
             + (" on a 4-bit (QLoRA) base." if settings.get("load_in_4bit", True) else ".") + "\n",
             _settings_section(settings), _metrics_section(run_dir), _data_section(run_dir),
             _usage_section(name, base, settings)]
    return "\n".join(p for p in parts if p)


def _settings_section(settings: dict) -> str:
    rows = [f"| `{k}` | `{settings[k]}` |" for k in CARD_SETTINGS if settings.get(k) is not None]
    return "## Training settings\n\n| setting | value |\n|---|---|\n" + "\n".join(rows) + "\n" if rows else ""


def _metrics_section(run_dir: Path) -> str:
    last = _last_metrics(run_dir / "metrics.jsonl")
    rows = [f"| `{k}` | {last[k]:.4g} |" if isinstance(last[k], float) else f"| `{k}` | {last[k]} |"
            for k in CARD_METRICS if k in last]
    if not rows:
        return ""
    return ("## Final metrics\n\nThe last logged step of `metrics.jsonl` (rewards are beta x log-ratio to the "
            "base model):\n\n| metric | value |\n|---|---|\n" + "\n".join(rows) + "\n")


def _data_section(run_dir: Path) -> str:
    path = run_dir / "data_report.json"
    if not path.is_file():
        return ""
    report = json.loads(path.read_text())
    facts = [f"- examples: {report.get('rows_out', '?')} ({report.get('n_desirable', '?')} desirable, "
             f"{report.get('n_undesirable', '?')} undesirable) from {report.get('rows_in', '?')} "
             f"{report.get('row_unit', 'row')}s"]
    if report.get("data_format"):
        facts.append(f"- format: {report['data_format']}")
    dropped = sum(len(v) for v in (report.get("dropped") or {}).values())
    if dropped:
        facts.append(f"- dropped: {dropped} rows ({', '.join(sorted(report['dropped']))})")
    for warning in report.get("warnings") or []:
        facts.append(f"- note: {warning}")
    return "## Data\n\n" + "\n".join(facts) + "\n"


def _usage_section(name: str, base: str, settings: dict) -> str:
    base_arg = settings.get("model") or "BASE_MODEL"
    return f"""## How to use

With peft (the adapter on its base):

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base_arg}", dtype="auto", device_map="auto")
model = PeftModel.from_pretrained(base, "{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
```

As a GGUF file for llama.cpp / Ollama / LM Studio (from a local copy of this folder):

```bash
python -m kto_lite export --adapter ADAPTER_FOLDER --gguf --quant q8_0   # merged model + Modelfile
llama-cli -m ADAPTER_FOLDER/gguf/*-quantized-q8_0.gguf
ollama create my-model -f ADAPTER_FOLDER/gguf/*-quantized-q8_0.Modelfile && ollama run my-model
```

The merged GGUF adds the update to the de-quantized 4-bit weights the adapter was trained on, so it
behaves like the trained model. `--gguf_lora` writes the adapter alone (`llama-cli --lora`, Ollama
`ADAPTER`) to apply on top of the base model's own GGUF.
"""


def write_model_card(run_dir: str | Path, repo_id: str | None = None) -> Path:
    """Write README.md in the run folder (replacing the one peft writes) and return its path."""
    path = Path(run_dir) / "README.md"
    path.write_text(model_card(run_dir, repo_id), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- access and upload


def check_hub_access(repo_id: str) -> str:
    """The token to upload with; ConfigError when the repo id is malformed or no token is available.

    Offline: looks at the token only, does not ask the Hub whether it may write to the repo.
    """
    from huggingface_hub import get_token

    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        raise ConfigError(f"push_to_hub: {repo_id!r} is not a Hub repo id; use OWNER/NAME, e.g. me/my-kto-model")
    token = get_token()
    if not token:
        raise ConfigError("push_to_hub: no Hugging Face token. Set HF_TOKEN or run `hf auth login` (a token "
                          "with write access), or leave push_to_hub empty.")
    return token


def _api():
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise ConfigError("push_to_hub: HF_HUB_OFFLINE is set; unset it to upload")
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)


def upload_plan(run_dir: str | Path, extra: list[str | Path] = ()) -> dict[str, Path]:
    """path in the repo -> local file: the run's shipped files (runs.ZIP_PATTERNS) + extra files / folders."""

    plan = {p.name: p for p in run_files(Path(run_dir))}
    for item in map(Path, extra):
        if item.is_dir():
            plan.update({f"{item.name}/{p.relative_to(item).as_posix()}": p
                         for p in sorted(item.rglob("*")) if p.is_file()})
        else:
            plan[item.name] = item
    return plan


def push_run(run_dir: str | Path, repo_id: str, private: bool = True, extra: list[str | Path] = ()) -> str:
    """Create the repo if needed and upload the run (one commit). Returns the repo's URL."""
    from huggingface_hub import CommitOperationAdd

    token = check_hub_access(repo_id)
    api = _api()
    url = str(api.create_repo(repo_id, private=private, exist_ok=True, token=token))
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                  for name, path in upload_plan(run_dir, extra).items()]
    api.create_commit(repo_id, operations, commit_message=f"kto_lite: upload {Path(run_dir).resolve().name}",
                      token=token)
    return url
