"""The model: 4-bit QLoRA path, LoRA-only gradients, and the reference = adapters-off base."""

import bitsandbytes.functional as bnbF
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import make_model_dir
from transformers import AutoModelForCausalLM

from kto_lite.config import TrainConfig
from kto_lite.model import add_lora, compute_dtype, load_base, no_grad_policy, reference_mode
from kto_lite.training.batching import collate
from kto_lite.training.logps import completion_logps


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def batch():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(7, 80, (n,), generator=g).tolist() for n in (4, 7)]
    completions = [torch.randint(7, 80, (n,), generator=g).tolist() for n in (6, 3)]
    return collate(prompts, completions, pad_token_id=0)


def test_cpu_compute_dtype_is_fp32():
    assert compute_dtype() == torch.float32


def test_4bit_base_is_quantized_and_lora_only_trains(model_dir):
    model = add_lora(load_base(str(model_dir), load_in_4bit=True), TrainConfig(lora_r=4, lora_alpha=8))
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear4bit"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    model.train()
    completion_logps(model, batch()).sum().backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert set(with_grad) == set(trainable)  # every LoRA weight gets a gradient, nothing else does


def test_no_trainable_parameter_is_refused(model_dir):
    with pytest.raises(ValueError):
        add_lora(load_base(str(model_dir), load_in_4bit=False), TrainConfig(lora_target_modules=["no_such_layer"]))


def test_4bit_lora_gradients_equal_dequantized_fp32_model(model_dir):
    """bitsandbytes' CPU 4-bit matmul backpropagates exactly like the same weights in fp32."""
    m4 = load_base(str(model_dir), load_in_4bit=True)
    m32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for name, module in m4.named_modules():
        if hasattr(getattr(module, "weight", None), "quant_state"):
            dense = bnbF.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            m32.get_submodule(name).weight.data.copy_(dense)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    grads = []
    for base in (m4, m32):
        torch.manual_seed(0)
        model = get_peft_model(base, lora).train()
        (completion_logps(model, batch()) * torch.tensor([1.0, -1.0])).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("load_in_4bit", [True, False])
def test_reference_mode_is_the_adapters_off_base(model_dir, load_in_4bit):
    model = add_lora(load_base(str(model_dir), load_in_4bit=load_in_4bit), TrainConfig(lora_r=4))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # a "trained" adapter that changes outputs
    model.train()
    b = batch()
    fresh = load_base(str(model_dir), load_in_4bit=load_in_4bit).eval()
    with torch.no_grad():
        expected = completion_logps(fresh, b)
        policy = completion_logps(model, b)
    with reference_mode(model):
        reference = completion_logps(model, b)
        assert not torch.is_grad_enabled() and not model.training
    assert model.training  # restored
    # (a freshly loaded 4-bit base runs bitsandbytes' repacked CPU inference kernel: last-bit differences)
    torch.testing.assert_close(reference, expected, rtol=1e-4, atol=1e-5)
    assert (policy - expected).abs().max() > 1e-2


def test_reference_and_kl_passes_do_not_change_training_gradients(model_dir):
    """bitsandbytes repacks 4-bit weights for CPU inference on an eval no-grad pass; its kernel then
    drops input gradients. add_lora must keep training gradients identical after such passes."""
    model = add_lora(load_base(str(model_dir), load_in_4bit=True), TrainConfig(lora_r=4, lora_dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)

    def grads():
        model.train()
        model.zero_grad()
        (completion_logps(model, batch()) * torch.tensor([1.0, -1.0])).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    with reference_mode(model):
        completion_logps(model, batch())
    with no_grad_policy(model):
        completion_logps(model, batch())
    after = grads()
    for n in before:
        torch.testing.assert_close(after[n], before[n], rtol=1e-5, atol=1e-6)
