"""Completion log-probs: equal to the naive full-logits computation, and padding-free rows equal padded rows.

Packed rows (one row, position ids restarting per sequence, no mask) must give the same log-probs and
the same LoRA gradients as padded rows on Llama, Qwen2 and Gemma-2 (sliding window shorter than the
rows, attention and final soft-capping), unquantized and 4-bit.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    BloomForCausalLM,
    Gemma2Config,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
)

from kto_lite.config import TrainConfig
from kto_lite.model import add_lora, load_base
from kto_lite.training.batching import collate, collate_shared
from kto_lite.training.logps import completion_logps, supports_packing, supports_shared_prompts
from kto_lite.training.packing import SEGMENT_PREFIX

VOCAB = 301


def naive_logps(model, rows):
    logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits.float()  # (B, T, V)
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, rows.input_ids[:, 1:, None]).squeeze(-1)
    return (token_logps * rows.completion_mask[:, 1:]).sum(-1)


def with_active_lora(model):
    for name, p in model.named_parameters():  # LoRA B starts at zero; make the adapter do something
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    peft = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    return with_active_lora(peft).eval()


def sequences(vocab=VOCAB, prompts=(5, 9, 2, 4), completions=(7, 3, 11, 0)):
    """Prompts and completions of mixed lengths; the last completion is empty (a KL row cut to nothing)."""
    g = torch.Generator().manual_seed(1)
    return ([torch.randint(0, vocab, (n,), generator=g).tolist() for n in prompts],
            [torch.randint(0, vocab, (n,), generator=g).tolist() for n in completions])


@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_values_equal_naive(model, chunk_size):
    rows = collate(*sequences(), pad_token_id=0)
    with torch.no_grad():
        ours = completion_logps(model, rows, chunk_size=chunk_size)
        naive = naive_logps(model, rows)
    assert ours.shape == (4,)
    torch.testing.assert_close(ours, naive, rtol=1e-5, atol=1e-4)
    assert torch.all(ours[:3] < 0) and ours[3] == 0


def test_gradients_equal_naive(model):
    rows = collate(*sequences(), pad_token_id=0)
    lora = [p for p in model.parameters() if p.requires_grad]
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    grads_ours = torch.autograd.grad((completion_logps(model, rows, chunk_size=5) * weights).sum(), lora)
    grads_naive = torch.autograd.grad((naive_logps(model, rows) * weights).sum(), lora)
    for ours, naive in zip(grads_ours, grads_naive):
        torch.testing.assert_close(ours, naive, rtol=1e-4, atol=1e-5)


def test_only_completion_tokens_count(model):
    prompts, completions = sequences()
    with torch.no_grad():
        full = completion_logps(model, collate(prompts, completions, 0))
        changed_prompt = [list(p) for p in prompts]
        changed_prompt[0][1] = (changed_prompt[0][1] + 1) % VOCAB  # a prompt token changes the context...
        changed = completion_logps(model, collate(changed_prompt, completions, 0))
    assert changed[0] != full[0] and torch.equal(changed[1:], full[1:])  # ...of its own row only


# ---------------------------------------------------------------------- padding-free rows
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
ARCHS = {
    "llama": lambda: LlamaConfig(**TINY),
    "qwen2": lambda: Qwen2Config(**TINY),  # q/k/v biases
    # sliding window 6 < the rows' lengths, so the packed sliding mask must restart per sequence too
    "gemma2": lambda: Gemma2Config(**TINY, head_dim=16, sliding_window=6, attn_logit_softcapping=5.0,
                                   final_logit_softcapping=3.0),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root, dirs = tmp_path_factory.mktemp("packing_models"), {}
    for arch, make in ARCHS.items():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(make()).save_pretrained(root / arch)
        dirs[arch] = root / arch
    return dirs


def trainer_model(path, load_in_4bit):
    """The trainer's model: load_base (4-bit NF4 or not) + add_lora, LoRA B made non-zero."""
    config = TrainConfig(model=str(path), lora_r=4, lora_alpha=8, lora_dropout=0.0, load_in_4bit=load_in_4bit,
                         gradient_checkpointing=True)
    torch.manual_seed(0)
    model = with_active_lora(add_lora(load_base(str(path), load_in_4bit=load_in_4bit), config))
    model.train()  # gradient checkpointing recomputes the layers in backward: packed masks must survive it
    return model


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["full", "4bit"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_packed_equals_padded(model_dirs, arch, load_in_4bit):
    model = trainer_model(model_dirs[arch], load_in_4bit)
    prompts, completions = sequences()
    padded, packed = collate(prompts, completions, 0), collate(prompts, completions, 0, packed=True)
    assert packed.input_ids.shape == (1, packed.tokens()) and packed.tokens() == padded.tokens()
    lora = [p for p in model.parameters() if p.requires_grad]
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    values, grads = {}, {}
    for name, rows in (("padded", padded), ("packed", packed)):
        values[name] = completion_logps(model, rows)
        grads[name] = torch.autograd.grad((values[name] * weights).sum(), lora)
    torch.testing.assert_close(values["packed"], values["padded"], rtol=1e-5, atol=1e-4)
    assert values["packed"][3] == 0  # empty completion
    for a, b in zip(grads["packed"], grads["padded"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * (1 + b.abs().max().item()))
    assert model.get_base_model().config._attn_implementation.startswith(SEGMENT_PREFIX)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_supported_architectures_pack(model_dirs, arch):
    model = trainer_model(model_dirs[arch], False)
    assert supports_packing(model)
    # sdpa (Llama, Qwen2) and eager (Gemma-2: sdpa cannot softcap) both attend sequence by sequence
    assert model.get_base_model().config._attn_implementation.startswith(SEGMENT_PREFIX)


def test_segment_attention_equals_transformers_block_mask(model):
    """The per-sequence wrapper gives what transformers' own packed block mask gives (without the wrapper)."""
    fresh = LlamaForCausalLM(model.get_base_model().config.__class__(**TINY)).eval()
    rows = collate(*sequences(), pad_token_id=0, packed=True)
    with torch.no_grad():
        body = fresh.get_decoder()
        native = body(input_ids=rows.input_ids, position_ids=rows.position_ids, use_cache=False).last_hidden_state
        assert fresh.config._attn_implementation == "sdpa"
        segmented = completion_logps(fresh, rows)
        assert fresh.config._attn_implementation == SEGMENT_PREFIX + "sdpa"
        again = body(input_ids=rows.input_ids, position_ids=rows.position_ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(again, native, rtol=1e-5, atol=1e-5)
    assert segmented.shape == (4,)


def test_a_model_without_packed_masks_gets_the_padded_path():
    """Bloom (ALiBi, its own mask from the attention mask): packed rows would leak across sequences."""
    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4)).eval()
    assert not supports_packing(bloom)
    prompts, completions = sequences()
    with torch.no_grad():
        padded = completion_logps(bloom, collate(prompts, completions, 0))
        packed = completion_logps(bloom, collate(prompts, completions, 0, packed=True))
    assert (packed[0] - padded[0]).abs() < 1e-5  # the first sequence has nothing before it to see...
    assert (packed[1:3] - padded[1:3]).abs().max() > 1e-4  # ...the others see their neighbours: the padded path


def test_reference_pass_packs_short_rows_into_fewer_passes(model_dirs, monkeypatch):
    """compute_reference_logps: packed, token-budgeted passes give the padded per-row numbers, in fewer passes."""
    from kto_lite.training import reference

    model = trainer_model(model_dirs["llama"], True)
    prompts, completions = sequences(prompts=(5, 9, 2, 4, 30, 3), completions=(7, 3, 11, 0, 2, 1))
    seqs = list(zip(prompts, completions))
    passes = []
    real = reference.completion_logps
    monkeypatch.setattr(reference, "completion_logps", lambda m, rows: passes.append(rows) or real(m, rows))
    values = reference.compute_reference_logps(model, seqs, pad_token_id=0, batch_size=2, show_progress=False)
    assert all(rows.packed for rows in passes)
    assert len(passes) < 3  # padded batches of 2 would take 3 passes; the budget is 2 x 32 tokens
    assert max(rows.tokens() for rows in passes) <= 2 * 32
    from kto_lite.model import reference_mode

    with reference_mode(model):
        one_by_one = torch.cat([completion_logps(model, collate([p], [c], 0)) for p, c in seqs])
    torch.testing.assert_close(values, one_by_one, rtol=1e-5, atol=1e-4)
    assert values[3] == 0


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_packed_masks_hold_only_the_diagonal_blocks(model_dirs, arch):
    """No (N x N) mask for N packed tokens: each layer gets one (n_i x n_i) block per sequence."""
    from kto_lite.training.packing import BlockMasks

    model = trainer_model(model_dirs[arch], False)
    prompts, completions = sequences()
    rows = collate(prompts, completions, 0, packed=True)
    seen = []
    layer = model.get_base_model().get_decoder().layers[0].self_attn
    hook = layer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["attention_mask"]), with_kwargs=True)
    try:
        with torch.no_grad():
            completion_logps(model, rows)
    finally:
        hook.remove()
    assert isinstance(seen[-1], BlockMasks)  # (earlier calls: the head check on unpacked tokens)
    assert [tuple(m.shape[-2:]) for m in seen[-1]] == [(p + c, p + c) for p, c in zip(map(len, prompts),
                                                                                       map(len, completions))]


# ---------------------------------------------------------------------- shared prompts
@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["full", "4bit"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_shared_prompt_rows_equal_separate_rows(model_dirs, arch, load_in_4bit):
    """Each prompt once with two completions (the example's and its KL partner's) gives each completion
    the log-probs and LoRA gradients it gets alone after its prompt (Gemma-2: sliding window 6 < rows)."""
    model = trainer_model(model_dirs[arch], load_in_4bit)
    prompts, completions = sequences()
    _, kl_completions = sequences(prompts=(1, 1, 1, 1), completions=(4, 12, 0, 6))
    shared = collate_shared(prompts, [completions, kl_completions], max_length=14)
    separate = [collate(prompts, completions, 0, packed=True), collate(prompts, kl_completions, 0, 14, packed=True)]
    assert shared.tokens() == sum(map(len, prompts)) + sum(map(len, completions)) + 4 + 5 + 0 + 6  # KL cut at 14
    assert shared.tokens(len(prompts)) == separate[0].tokens()  # the examples' tokens, prompts counted once
    lora = [p for p in model.parameters() if p.requires_grad]
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.7, -1.1, 2.0, 0.3])
    values = completion_logps(model, shared)
    alone = torch.cat([completion_logps(model, rows) for rows in separate])
    torch.testing.assert_close(values, alone, rtol=1e-5, atol=1e-4)
    assert values[3] == 0 and values[6] == 0  # empty completions score nothing
    for a, b in zip(torch.autograd.grad((values * weights).sum(), lora),
                    torch.autograd.grad((alone * weights).sum(), lora)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * (1 + b.abs().max().item()))
    assert supports_shared_prompts(model)


def test_a_completion_does_not_see_its_siblings(model):
    """Changing the example's completion changes nothing in its KL sibling, and vice versa."""
    prompts, completions = sequences()
    kl = [list(reversed(c)) for c in completions]
    with torch.no_grad():
        base = completion_logps(model, collate_shared(prompts, [completions, kl]))
        changed = [list(c) for c in completions]
        changed[1][0] = (changed[1][0] + 1) % VOCAB
        after = completion_logps(model, collate_shared(prompts, [changed, kl]))
    assert after[1] != base[1] and torch.equal(after[[0, 2, 3, 4, 5, 6, 7]], base[[0, 2, 3, 4, 5, 6, 7]])


# ---------------------------------------------------------------------- shared prompts and the model's own mask
def mask_config(impl: str):
    """A tiny config with both a sliding window (3) and an attention chunk (4), shorter than the rows below."""
    config = LlamaConfig(**TINY)
    config.sliding_window, config.attention_chunk_size = 3, 4
    config._attn_implementation = impl
    return config


@pytest.fixture(scope="module")
def segment_impl():
    """kto_lite's segment attention, registered with transformers (as any model switched to it does)."""
    from kto_lite.training.packing import use_segment_attention

    return use_segment_attention(LlamaForCausalLM(LlamaConfig(**TINY)))


def allowed(mask) -> torch.Tensor:
    """(q, k) bool: what a transformers mask lets attend (sdpa: bool; eager: 0 where allowed, -inf elsewhere)."""
    mask = mask[0, 0]
    return mask if mask.dtype == torch.bool else mask == 0


MASK_CREATORS = ("create_causal_mask", "create_sliding_window_causal_mask", "create_chunked_causal_mask")


@pytest.mark.parametrize("creator", MASK_CREATORS)
def test_shared_prompt_masks_are_the_models_own_mask_for_each_completion(segment_impl, creator):
    """On a shared-prompt row each completion gets exactly the mask the model builds for [prompt | completion]
    alone: full causal, a sliding window, or Llama-4's chunks (a chunk is not a window)."""
    import transformers.masking_utils as masking

    from kto_lite.training.packing import segment_masks

    create = getattr(masking, creator)
    prompts = [[1] * 6, [2] * 3]
    completions = [[[3] * 5, [4] * 2], [[5] * 7, [6] * 1]]  # [k][i]: completion k of prompt i
    rows = collate_shared(prompts, completions)
    with segment_masks(rows.position_ids, rows.branch):
        blocks = create(config=mask_config(segment_impl), inputs_embeds=torch.zeros(1, rows.input_ids.shape[1], 4),
                        attention_mask=None, cache=None, position_ids=rows.position_ids)
    for i, (start, end) in enumerate(blocks.bounds):
        shared = allowed(blocks[i])
        branch = rows.branch[0, start:end]
        for k in range(len(completions)):
            keep = torch.nonzero((branch == 0) | (branch == k + 1)).flatten()  # the prompt and completion k
            n = len(keep)
            alone = create(config=mask_config(segment_impl.removeprefix(SEGMENT_PREFIX)),
                           inputs_embeds=torch.zeros(1, n, 4), attention_mask=None, cache=None,
                           position_ids=torch.arange(n)[None], allow_is_causal_skip=False)
            assert torch.equal(shared[keep][:, keep], allowed(alone)), (creator, i, k)
            others = torch.nonzero((branch != 0) & (branch != k + 1)).flatten()
            assert not shared[keep[len(prompts[i]):]][:, others].any()  # never a sibling completion


def test_a_mask_that_cannot_be_composed_is_refused(segment_impl):
    """A model that adds its own and/or mask function (images attending both ways, say), or a bidirectional one:
    shared prompts would drop or contradict it, so the mask refuses (the layout probe then says unsupported)."""
    import transformers.masking_utils as masking

    from kto_lite.training.packing import segment_masks

    rows = collate_shared([[1] * 6], [[[3] * 5], [[5] * 7]])
    embeds = torch.zeros(1, rows.input_ids.shape[1], 4)
    with segment_masks(rows.position_ids, rows.branch), pytest.raises(NotImplementedError, match="shared prompts"):
        masking.create_causal_mask(config=mask_config(segment_impl), inputs_embeds=embeds, attention_mask=None,
                                   cache=None, position_ids=rows.position_ids,
                                   and_mask_function=lambda b, h, q, k: k >= 0)
    config = mask_config(segment_impl)
    config.is_causal = False
    with segment_masks(rows.position_ids, rows.branch), pytest.raises(NotImplementedError, match="shared prompts"):
        masking.create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None, cache=None,
                                   position_ids=rows.position_ids)


@pytest.mark.parametrize("span", ["sliding_window", "attention_chunk_size"])
def test_layout_probes_cross_the_models_window(span):
    """The packing and shared-prompt probes use rows longer than the model's sliding window / attention chunk
    (here 20 tokens, longer than short probe rows), so a layout that breaks only past it is caught; a window
    longer than the run's rows (max_length) is never crossed by them and is not probed."""
    from transformers import MistralConfig, MistralForCausalLM

    from kto_lite.training import logps

    def probed_positions(max_length):
        torch.manual_seed(0)
        config = MistralConfig(**TINY, head_dim=16, sliding_window=None)
        setattr(config, span, 20)
        model = MistralForCausalLM(config).eval()
        seen = []

        def record(module, args, kwargs):  # the last position of the rows (padded rows: their length - 1)
            positions, ids = kwargs.get("position_ids"), kwargs.get("input_ids", args[0] if args else None)
            seen.append(int(positions.max()) if positions is not None else ids.shape[1] - 1)

        model.model.register_forward_pre_hook(record, with_kwargs=True)
        assert logps.supports_packing(model, max_length=max_length)
        packing = max(seen)
        seen.clear()
        logps.supports_shared_prompts(model, max_length=max_length)
        return packing, max(seen)

    assert all(position >= 20 for position in probed_positions(max_length=512))
    assert all(position < 20 for position in probed_positions(max_length=16))


# ---------------------------------------------------------------------- what a layout probe takes for "unsupported"
def drop_position_ids(monkeypatch):
    """Llama's attention as some architectures' are written (Llama-4's): not given the position ids."""
    from transformers.models.llama import modeling_llama

    real = modeling_llama.LlamaAttention.forward

    def forward(self, *args, **kwargs):
        kwargs.pop("position_ids", None)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", forward)


def test_a_model_whose_attention_gets_no_position_ids_is_not_packed(monkeypatch):
    """Its attention cannot tell where a packed sequence starts (and may compute positions from the row itself):
    padded rows, which still give the naive numbers."""
    drop_position_ids(monkeypatch)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    assert not supports_packing(model) and not supports_shared_prompts(model)
    rows = collate(*sequences(), pad_token_id=0)
    with torch.no_grad():
        torch.testing.assert_close(completion_logps(model, rows), naive_logps(model, rows), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("error", [KeyError("position_ids"), TypeError("unexpected keyword argument")],
                         ids=["KeyError", "TypeError"])
def test_a_probe_that_fails_means_unsupported(monkeypatch, error):
    """What a model's code raises when it cannot take a packed layout: the probe answers "no" (padded rows)."""
    from transformers.models.llama import modeling_llama

    def forward(self, *args, **kwargs):
        raise error

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", forward)
    assert not supports_packing(model)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("CUDA error: out of memory")], ids=["OutOfMemoryError", "message"])
def test_out_of_memory_in_a_probe_is_raised_not_taken_for_unsupported(monkeypatch, error):
    """A probe that runs out of memory says nothing about the layout: the error goes to the user (who must lower
    batch_size or max_length anyway), never a silent switch to the slower padded rows."""
    from transformers.models.llama import modeling_llama

    def forward(self, *args, **kwargs):
        raise error

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", forward)
    with pytest.raises(type(error), match="out of memory"):
        supports_packing(model)
