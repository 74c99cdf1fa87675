"""The built-in demo: a tiny committed chat model, its arithmetic task and sample feedback files.

See docs/demo_model.md. The model is rebuilt by `python recipes/build_demo_model.py`.
"""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
DEMO_MODEL_DIR = DEMO_DIR / "model"  # config.json, model.safetensors, tokenizer files, chat template
DEMO_DATA_DIR = DEMO_DIR / "data"

# Binary feedback on the demo model's own samples, in the three data formats kto_lite reads.
DEMO_SAMPLES: dict[str, Path] = {
    "kto": DEMO_DATA_DIR / "demo_kto.jsonl",  # prompt / completion / label
    "paired": DEMO_DATA_DIR / "demo_paired.jsonl",  # prompt / chosen / rejected
    "messages": DEMO_DATA_DIR / "demo_messages.jsonl",  # messages / label
}
