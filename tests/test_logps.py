"""Chunked completion log-probs equal the naive full-logits computation, values and gradients."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from kto_lite.batching import collate
from kto_lite.logps import completion_logps


def naive_logps(model, input_ids, attention_mask, completion_mask):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # (B, T, V)
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (token_logps * completion_mask[:, 1:]).sum(-1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=301, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(config)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in peft.named_parameters():  # LoRA B starts at zero; make the adapter do something
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return peft.eval()


def batch():
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 301, (n,), generator=g).tolist() for n in (5, 9, 2)]
    completions = [torch.randint(0, 301, (n,), generator=g).tolist() for n in (7, 3, 11)]
    return collate(prompts, completions, pad_token_id=0)


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_values_equal_naive(model, chunk_size):
    b = batch()
    with torch.no_grad():
        ours = completion_logps(model, **b, chunk_size=chunk_size)
        naive = naive_logps(model, **b)
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, naive, rtol=1e-5, atol=1e-4)
    assert torch.all(ours < 0)


def test_gradients_equal_naive(model):
    b = batch()
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    weights = torch.tensor([1.0, -2.0, 0.5])
    grads_ours = torch.autograd.grad((completion_logps(model, **b, chunk_size=5) * weights).sum(), lora)
    grads_naive = torch.autograd.grad((naive_logps(model, **b) * weights).sum(), lora)
    for ours, naive in zip(grads_ours, grads_naive):
        torch.testing.assert_close(ours, naive, rtol=1e-4, atol=1e-5)


def test_only_completion_tokens_count(model):
    b = batch()
    with torch.no_grad():
        full = completion_logps(model, **b)
        b2 = dict(b)
        b2["input_ids"] = b["input_ids"].clone()
        b2["input_ids"][0, 1] = (b["input_ids"][0, 1] + 1) % 301  # a prompt token changes the context...
        changed = completion_logps(model, **b2)
        b3 = dict(b)
        b3["completion_mask"] = b["completion_mask"].clone()
        b3["completion_mask"][2] = 0  # no completion token: the sum is exactly 0
        empty = completion_logps(model, **b3)
    assert changed[0] != full[0] and changed[1] == full[1]
    assert empty[2] == 0 and empty[0] == full[0]


def test_softcapping_is_applied(model):
    b = batch()
    model.get_base_model().config.final_logit_softcapping = 1.0
    try:
        with torch.no_grad():
            capped = completion_logps(model, **b)
    finally:
        model.get_base_model().config.final_logit_softcapping = None
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logits = torch.tanh(logits)  # cap 1.0
        expected = (logits[:, :-1].log_softmax(-1).gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
                    * b["completion_mask"][:, 1:]).sum(-1)
    torch.testing.assert_close(capped, expected, rtol=1e-5, atol=1e-4)
