"""The demo task (recipes/demo_task.py: judge, prompts), the shipped demo model and its sample files."""

import copy
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from kto_lite.demo import DEMO_MODEL_DIR, DEMO_SAMPLES
from kto_lite.generation import generate_samples
from kto_lite.judges import make_judge
from kto_lite.model import keep_4bit_layout_trainable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import demo_task as task  # noqa: E402


def sample_texts(model, tokenizer, prompts, *, n=1, seed=0, batch_size=64):
    """result[i][j]: prompt i's j-th sample, as the demo samples (temperature 1, no nucleus cut)."""
    samples = generate_samples(model, tokenizer, prompts, n=n, seed=seed, batch_size=batch_size, **task.SAMPLING)
    return [[s.text for s in completions] for _, completions in samples]


# ---------------------------------------------------------------- judge
@pytest.mark.parametrize(
    "prompt, completion",
    [
        ("What is 17 + 25?", "17 + 25 = 42."),
        ("What is 40 - 13?", "40 - 13 = 27."),
        ("What is 0 - 0?", " 0 - 0 = 0.\n"),
    ],
)
def test_judge_accepts_the_right_answer(prompt, completion):
    assert task.judge(prompt, completion)


@pytest.mark.parametrize(
    "completion",
    [
        "17 + 25 = 43.",  # wrong result
        "17 + 25 = 32.",
        "17 + 52 = 42.",  # question restated wrongly
        "17 - 25 = 42.",
        "42.",  # malformed: not the expected sentence
        "17 + 25 = 42",
        "17+25=42.",
        "The answer is 42.",
        "17 + 25 = 42. 17 + 25 = 42.",
        "17 + 25 = 042.",
        "",
    ],
)
def test_judge_rejects_wrong_or_malformed_answers(completion):
    assert not task.judge("What is 17 + 25?", completion)


def test_reference_answer_passes_the_judge_and_wrong_answer_does_not():
    rng = random.Random(0)
    for prompt in task.make_prompts(50, seed=1) + ["What is 0 - 0?", "What is 50 + 50?"]:
        assert task.judge(prompt, task.reference_answer(prompt))
        wrong = task.wrong_answer(prompt, rng)
        assert not task.judge(prompt, wrong)
        assert int(wrong.split(" = ")[1].rstrip(".")) >= 0


def test_prompt_file_with_the_exact_judge_is_the_task_judge(tmp_path):
    rows = [json.loads(line) for line in task.write_prompts(tmp_path / "p.jsonl", 30, seed=2).read_text().splitlines()]
    exact, rng = make_judge("exact"), random.Random(1)
    for row in rows:
        right, wrong = task.reference_answer(row["prompt"]), task.wrong_answer(row["prompt"], rng)
        assert exact(row["prompt"], right, row) and task.judge(row["prompt"], right)
        assert not exact(row["prompt"], wrong, row) and not task.judge(row["prompt"], wrong)
        assert task.reversed_judge(row["prompt"], wrong) and not task.reversed_judge(row["prompt"], right)


def test_parse_prompt_rejects_other_text():
    assert task.parse_prompt("What is 3 - 2?") == (3, "-", 2)
    with pytest.raises(ValueError):
        task.parse_prompt("What is 3 * 2?")


# ---------------------------------------------------------------- prompts
def test_splits_are_disjoint_and_cover_the_task():
    train, eval_ = set(task.all_prompts("train")), set(task.all_prompts("eval"))
    assert not train & eval_
    assert 0.15 < len(eval_) / (len(train) + len(eval_)) < 0.25
    assert set(task.make_prompts(len(eval_), seed=0, split="eval")) == eval_


def test_make_prompts_is_deterministic_and_distinct():
    a = task.make_prompts(100, seed=3, split="eval")
    assert a == task.make_prompts(100, seed=3, split="eval")
    assert a != task.make_prompts(100, seed=4, split="eval")
    assert len(set(a)) == 100
    with pytest.raises(ValueError):
        task.make_prompts(10**6, seed=0)
    with pytest.raises(ValueError):
        task.make_prompts(1, seed=0, split="test")


# ---------------------------------------------------------------- the shipped model
@pytest.fixture(scope="module")
def demo():
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR, local_files_only=True)
    return model, tokenizer


def test_demo_model_is_small_and_has_a_chat_template(demo):
    model, tokenizer = demo
    assert (DEMO_MODEL_DIR / "model.safetensors").stat().st_size < 20e6
    assert model.config.hidden_size % 64 == 0
    messages = [{"role": "user", "content": "What is 1 + 2?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": "1 + 2 = 3."}], tokenize=False
    )
    assert full.startswith(prompt)
    assert full.endswith(tokenizer.eos_token)  # the assistant turn ends with eos, so generation stops there
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_sampling_is_deterministic_under_the_seed(demo):
    model, tokenizer = demo
    prompts = task.make_prompts(8, seed=0, split="eval")
    a = sample_texts(model, tokenizer, prompts, n=2, seed=5, batch_size=4)
    assert a == sample_texts(model, tokenizer, prompts, n=2, seed=5, batch_size=4)
    assert len(a) == 8 and all(len(s) == 2 for s in a)
    assert a != sample_texts(model, tokenizer, prompts, n=2, seed=6, batch_size=4)


def test_held_out_sampled_accuracy_is_partial(demo):
    # The demo is useful only if the model is right sometimes (something to reinforce) and wrong
    # sometimes (something to learn away). Built at ~0.5; the band is broad for binomial noise.
    model, tokenizer = demo
    prompts = task.make_prompts(64, seed=0, split="eval")
    assert 0.15 <= task.accuracy(model, tokenizer, prompts, seed=0) <= 0.75
    # ...while the right answer is the model's most likely one: greedy decoding is nearly always right.
    assert task.accuracy(model, tokenizer, prompts, seed=0, temperature=0) >= 0.8


def test_sampling_works_through_peft_and_restores_train_mode(demo):
    model, tokenizer = demo
    from peft import LoraConfig, get_peft_model

    prompts = task.make_prompts(8, seed=1, split="eval")
    expected = sample_texts(model, tokenizer, prompts, seed=2)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(copy.deepcopy(model), lora)
    peft_model.train()
    # A fresh LoRA adapter is a no-op (B = 0), so the samples must be exactly the base model's.
    assert sample_texts(peft_model, tokenizer, prompts, seed=2) == expected
    assert peft_model.training


def test_demo_model_loads_in_4bit(demo):
    _, tokenizer = demo
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(
        DEMO_MODEL_DIR, quantization_config=quantization, local_files_only=True
    )
    # A model that will train after sampling keeps the trainable 4-bit layout: on AVX512-BF16 CPUs
    # bitsandbytes would otherwise repack its layers for inference, after which no gradient flows back.
    keep_4bit_layout_trainable(model)
    prompts = task.make_prompts(32, seed=0, split="eval")
    assert task.accuracy(model, tokenizer, prompts, seed=0, temperature=0) >= 0.8
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    model.train()
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ---------------------------------------------------------------- the shipped sample files
def _rows(name):
    return [json.loads(line) for line in DEMO_SAMPLES[name].read_text().splitlines()]


def test_sample_files_exist_and_hold_both_labels():
    kto, messages, paired = _rows("kto"), _rows("messages"), _rows("paired")
    assert len(kto) >= 200 and {r["label"] for r in kto} == {True, False}
    assert all(r["label"] == task.judge(r["prompt"], r["completion"]) for r in kto)
    assert {r["label"] for r in messages} == {True, False}
    assert [m["messages"][-1]["content"] for m in messages] == [r["completion"] for r in kto]
    assert len(paired) >= 20
    assert all(
        task.judge(r["prompt"], r["chosen"]) and not task.judge(r["prompt"], r["rejected"]) for r in paired
    )
    train = set(task.all_prompts("train"))
    assert all(r["prompt"] in train for r in kto)  # feedback only on training prompts
    assert all(p.stat().st_size < 200_000 for p in DEMO_SAMPLES.values())
