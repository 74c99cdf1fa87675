"""The frozen output head: gradient check against autograd, memory of one block, each architecture's own logits."""

import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kto_lite.training.batching import collate
from kto_lite.training.head import FrozenHeadLogps, OutputHead, UnsupportedHead, output_head
from kto_lite.training.logps import completion_logps

V, H = 37, 6


def naive(hidden, weight, bias, targets, scale, softcap):
    logits = torch.nn.functional.linear(hidden, weight, bias).double() * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("scale,softcap,bias", [(1.0, None, False), (0.0625, None, True), (1.0, 0.7, False),
                                                (4.0, 1.5, True)])
def test_gradcheck_float64(scale, softcap, bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, H, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, generator=g)
    b = torch.randn(V, dtype=torch.float64, generator=g) if bias else None
    targets = torch.randint(0, V, (9,), generator=g)

    def f(h):
        return FrozenHeadLogps.apply(h, weight, b, targets, scale, softcap, 4)  # chunks of 4, 4, 1 rows

    # values in float64 against the naive log-softmax, then the Jacobian against finite differences
    torch.testing.assert_close(f(hidden).double(), naive(hidden, weight, b, targets, scale, softcap))
    assert torch.autograd.gradcheck(f, (hidden,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradient_equals_autograd_of_the_naive_head():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(50, H, generator=g, requires_grad=True)
    weight, targets = torch.randn(V, H, generator=g), torch.randint(0, V, (50,), generator=g)
    upstream = torch.randn(50, generator=g)
    ours = torch.autograd.grad((FrozenHeadLogps.apply(hidden, weight, None, targets, 2.0, 3.0, 7) * upstream).sum(),
                               hidden)[0]
    expected = torch.autograd.grad((naive(hidden, weight, None, targets, 2.0, 3.0).float() * upstream).sum(),
                                   hidden)[0]
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_no_gradient_work_without_grad():
    hidden = torch.randn(5, H)
    with torch.no_grad():
        out = FrozenHeadLogps.apply(hidden, torch.randn(V, H), None, torch.zeros(5, dtype=torch.long), 1.0, None, 2)
    assert not out.requires_grad and out.shape == (5,)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors created under the mode and still alive."""

    def __init__(self, ignore=()):
        super().__init__()
        self.live, self.current, self.peak = {key: 0 for key in ignore}, 0, 0

    def _free(self, key):
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in self.live:
                storage = t.untyped_storage()
                self.live[storage.data_ptr()] = storage.nbytes()
                self.current += storage.nbytes()
                weakref.finalize(storage, self._free, storage.data_ptr())
        self.peak = max(self.peak, self.current)
        return out


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peak_memory_is_one_block(softcap, dtype):
    """Forward with grad over many chunks holds one fp32 block (+ its half-precision copy, + tanh' when capped)
    on top of what it returns: out (M,) and J (M, H), never the (M x V) logits."""
    vocab, hidden_size, m = 4096, 32, 2000
    head = OutputHead(torch.nn.Linear(hidden_size, vocab, bias=False).to(dtype).requires_grad_(False), softcap=softcap)
    hidden = torch.randn(m, hidden_size, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (m,))
    rows = 100
    inputs = [head.module.weight, hidden, targets]  # created before: only what the head allocates counts
    with LiveBytes(ignore=[t.untyped_storage().data_ptr() for t in inputs]) as tracker:
        out = head.token_logps(hidden, targets, chunk_size=rows)
    kept = out.numel() * 4 + hidden.numel() * hidden.element_size()  # log-probs and J
    block = rows * vocab * (4 + (2 if dtype == torch.bfloat16 else 0) + (4 if softcap else 0))
    assert tracker.peak <= kept + block + 8 * rows * hidden_size, (tracker.peak, kept, block)
    assert tracker.peak < m * vocab * 4 / 4  # far below a (M x V) fp32 tensor
    head_rows = head.rows_per_chunk(dtype)  # the default chunk keeps that block at BLOCK_BYTES
    assert head_rows * vocab * (4 + (2 if dtype == torch.bfloat16 else 0) + (4 if softcap else 0)) <= 2**27


# ---------------------------------------------------------------------- architectures: their own forward
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
ARCHS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True)),
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**TINY, head_dim=16, final_logit_softcapping=0.5,
                                                     sliding_window=6)),
    "cohere": lambda: CohereForCausalLM(CohereConfig(**TINY, logit_scale=0.25)),
    "granite": lambda: GraniteForCausalLM(GraniteConfig(**TINY, logits_scaling=0.2)),
}


def lora(model):
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():  # LoRA B starts at zero; make the adapter do something
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def rows():
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 9, 2)]
    completions = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (7, 3, 11)]
    return collate(prompts, completions, pad_token_id=0)


def own_logps(model, r):
    """The model's own forward: full logits, its own transform, log-softmax, completion positions summed."""
    logits = model(input_ids=r.input_ids, attention_mask=r.attention_mask).logits.float()  # (B, T, V)
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, r.input_ids[:, 1:, None]).squeeze(-1)
    return (token_logps * r.completion_mask[:, 1:]).sum(-1)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_equals_the_models_own_forward(arch):
    torch.manual_seed(0)
    base = ARCHS[arch]()
    with torch.no_grad():  # make the logit transform matter: logits of a few units, capped or scaled
        base.get_output_embeddings().weight.mul_(30)
    model = lora(base)
    r = rows()
    weights = torch.tensor([1.0, -2.0, 0.5])
    ours = completion_logps(model, r, chunk_size=4)
    expected = own_logps(model, r)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-4)
    lora_params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((ours * weights).sum(), lora_params)
    grads_expected = torch.autograd.grad((expected * weights).sum(), lora_params)
    for a, b in zip(grads, grads_expected):  # fp32 sums in another order: tolerance relative to the tensor's scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * (1 + b.abs().max().item()))
    # the transform is not a no-op on these logits: a plain log-softmax of lm_head(h) would differ
    spec = output_head(model)
    if spec.scale != 1 or spec.softcap:
        plain = OutputHead(spec.module)
        with torch.no_grad():
            assert not torch.allclose(
                completion_logps(model, r), _with_head(model, r, plain), rtol=1e-3, atol=1e-2)


def _with_head(model, r, head):
    base = model.get_base_model()
    hidden = base.get_decoder()(input_ids=r.input_ids, attention_mask=r.attention_mask).last_hidden_state
    token = head.logits(hidden[:, :-1]).log_softmax(-1).gather(-1, r.input_ids[:, 1:, None]).squeeze(-1)
    return (token * r.completion_mask[:, 1:]).sum(-1)


class TemperatureLlama(LlamaForCausalLM):
    """An architecture-specific head kto_lite does not know: logits divided by a temperature."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits / 0.3
        return out


def test_unknown_head_is_refused():
    torch.manual_seed(0)
    model = lora(TemperatureLlama(LlamaConfig(**TINY)))
    with pytest.raises(UnsupportedHead, match="TemperatureLlama.*differ.*refuses"):
        completion_logps(model, rows())


def test_granite_divides_and_cohere_multiplies():
    granite = GraniteForCausalLM(GraniteConfig(**TINY, logits_scaling=8.0))
    cohere = CohereForCausalLM(CohereConfig(**TINY, logit_scale=0.0625))
    assert output_head(granite).scale == 1 / 8 and output_head(cohere).scale == 0.0625
    gemma = Gemma2ForCausalLM(Gemma2Config(**TINY, head_dim=16))
    assert output_head(gemma).softcap == 30.0 and output_head(gemma).scale == 1.0
