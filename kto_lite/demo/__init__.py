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

# What a run on the demo model uses for the fields a user left empty (TrainConfig.resolved), so that
# the app's untouched form and `python -m kto_lite train` with no arguments visibly learn (measured:
# docs/demo_model.md). Why they differ from a real model's defaults:
DEMO_SETTINGS = {
    # A right answer already has log-prob ~ -0.6, so its reward can rise by at most ~0.6 nats while
    # wrong answers can be pushed down without limit; at beta 0.1 that side dominates and probability
    # leaks to malformed answers. beta 0.5 saturates the undesirable side sooner.
    "beta": 0.5,
    # A 1M-parameter model with rank-16 adapters moves far less per step than a real one, and the
    # shipped feedback (400 rows) makes only 25 steps an epoch at the default batch of 16. Measured on
    # held-out demo questions (tests/test_demo_defaults.py): 1 epoch at 1e-3 gave reward margins of
    # 0.11-0.49 and no accuracy change; 3 epochs at 1e-3 gave margins 0.86-1.04 and sampled accuracy
    # 0.52 -> 0.56-0.62; 3e-3 pushed the desirable answers down too (chosen reward -1.4).
    "learning_rate": 1e-3,
    "num_epochs": 3,
}
