"""The memory estimator against measurements on tiny random models, on CPU, through kto_lite's real
QLoRA path (load_base -> add_lora -> completion_logps -> make_optimizer).

What is measured, and the tolerance it is held to:
- weights (packed 4-bit + quant state + fp32 embeddings), LoRA weights, gradients, optimizer state
  after one step: within 3% (exact arithmetic; the slack covers small buffers such as rotary tables);
- activations saved for backward (saved-tensor hooks, plus each checkpointed layer's inputs), with
  and without gradient checkpointing: within 15%;
- the peak of live tensors over a policy forward + no-grad KL pass + backward (a dispatch-mode
  tracker), against activations + the largest transient + gradients, and the peak of a no-grad
  pass alone: within 20%. The tracker sees every tensor an op returns, not the scratch buffers
  inside one op's kernel.
The GPU formulas (bf16 under accelerate's autocast) are checked on CPU with bf16 weights under CPU
autocast, with peft told that autocast is on, as it is on CUDA. Numbers: docs/memory.md.
"""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import Gemma2Config, LlamaConfig, Qwen2Config

from kto_lite import model as kto_model
from kto_lite.commands.estimate import main
from kto_lite.config import TrainConfig
from kto_lite.errors import MemoryEstimateError
from kto_lite.files import GIB
from kto_lite.memory import KNOWN_MODELS, ModelShape, estimate_memory, fit_plan, suggest_fit
from kto_lite.training.batching import Rows
from kto_lite.training.logps import completion_logps
from kto_lite.training.recipe import make_optimizer

SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=2048)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SHAPE, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**SHAPE, tie_word_embeddings=True),  # q/k/v biases, tied head
    "gemma2": lambda: Gemma2Config(**SHAPE, head_dim=64, query_pre_attn_scalar=64),  # eager attention, 4 norms
}
B, T, PROMPT = 4, 96, 4  # short prompts: nearly every token is scored, the worst case the estimate assumes


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root, dirs = tmp_path_factory.mktemp("memory_models"), {}
    for arch, make in CONFIGS.items():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(make()).save_pretrained(root / arch)
        dirs[arch] = root / arch
    return dirs


@pytest.fixture(autouse=True)
def _restore_cpu_autocast():
    """torch.autocast saves the previous state with torch.is_autocast_enabled, which `load` patches to
    True in autocast mode: on exit it would leave CPU autocast on for every later test. Put it back."""
    before = torch.is_autocast_enabled("cpu")
    yield
    torch.set_autocast_enabled("cpu", before)


def train_config(model_dir, **kw) -> TrainConfig:
    values = dict(model=str(model_dir), batch_size=B, max_length=T, max_prompt_length=PROMPT, lora_r=16,
                  lora_alpha=32)
    return TrainConfig(**{**values, **kw}).resolved()


def load(config: TrainConfig, monkeypatch, mode: str = "fp32"):
    """The trainer's model on CPU; mode "bf16" or "autocast" loads bf16 weights (see module docstring)."""
    if mode != "fp32":
        monkeypatch.setattr(kto_model, "compute_dtype", lambda: torch.bfloat16)
    if mode == "autocast":  # peft skips its fp32 input cast when it sees autocast, as on CUDA
        monkeypatch.setattr(torch, "is_autocast_enabled", lambda *args: True)
    # add_lora keeps bitsandbytes' trainable 4-bit layout (keep_4bit_layout_trainable), as in training
    model = kto_model.add_lora(kto_model.load_base(config.model, load_in_4bit=config.load_in_4bit), config)
    model.train()
    return model


def estimate(config, arch, mode="fp32"):
    return estimate_memory(config, CONFIGS[arch]().to_dict(), device="cpu",
                           compute_dtype="float32" if mode == "fp32" else "bfloat16", autocast=mode == "autocast")


def as_rows(ids, attention, completion) -> Rows:
    """Padded Rows from (B, T) ids, attention mask and completion mask."""
    rows = torch.arange(ids.shape[0])[:, None].expand_as(ids)
    return Rows(ids, completion, torch.where(attention.bool(), rows, -1).contiguous(), ids.shape[0],
                attention_mask=attention)


def batch(vocab=2048) -> Rows:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    attention = torch.ones(B, T, dtype=torch.long)
    attention[0, -10:] = 0  # a padded row, as in real batches (the estimate assumes a padding mask)
    completion = torch.zeros(B, T, dtype=torch.long)
    completion[:, PROMPT:] = 1
    return as_rows(ids, attention, completion)


def rows_storages(rows: Rows) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (rows.input_ids, rows.completion_mask, rows.sequence_index,
                                                      rows.attention_mask)}


def autocast(mode):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast")


def model_storages(model) -> set[int]:
    """data_ptr of every parameter, buffer and bitsandbytes quant-state tensor."""
    tensors = list(model.parameters()) + list(model.buffers())
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if state.nested:
                tensors += [state.offset, state.state2.absmax, state.state2.code]
    return {t.untyped_storage().data_ptr() for t in tensors if torch.is_tensor(t)}


def storage_bytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def close(measured, predicted, tolerance):
    return abs(predicted - measured) <= tolerance * measured


# ---------------------------------------------------------------------- static memory
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_weights_match_the_loaded_4bit_model(model_dirs, arch, monkeypatch):
    config = train_config(model_dirs[arch])
    base = kto_model.load_base(config.model)
    tensors = list(base.parameters()) + list(base.buffers())
    for p in base.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
    measured = storage_bytes(tensors)
    assert close(measured, estimate(config, arch).weights, 0.03), (measured, estimate(config, arch).weights)


def test_unquantized_weights(model_dirs):
    config = train_config(model_dirs["llama"], load_in_4bit=False)
    base = kto_model.load_base(config.model, load_in_4bit=False)
    measured = storage_bytes(list(base.parameters()))
    assert close(measured, estimate(config, "llama").weights, 0.03)


@pytest.mark.parametrize("optimizer", ["adamw_torch", "adamw_8bit"])
def test_lora_gradients_and_optimizer_state_after_one_step(model_dirs, optimizer, monkeypatch):
    config = train_config(model_dirs["llama"], optimizer=optimizer)
    model = load(config, monkeypatch)
    opt = make_optimizer(model, config)
    completion_logps(model, batch()).sum().backward()
    opt.step()
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    predicted = estimate(config, "llama")
    assert close(storage_bytes(trainable), predicted.lora_weights, 0.03)
    assert close(storage_bytes([p.grad for p in trainable]), predicted.gradients, 0.03)
    # bitsandbytes keeps tensors under 4,096 values in fp32: this model has both kinds
    assert close(storage_bytes(state), predicted.optimizer_state, 0.03), (storage_bytes(state), predicted.optimizer_state)


# ---------------------------------------------------------------------- activations
def saved_activation_bytes(model, inputs, mode) -> int:
    """Bytes of the distinct tensors autograd keeps for backward after one policy forward.

    Saved-tensor hooks see what every op saves; inside a checkpointed layer the checkpoint's own
    hooks take over (and save nothing), while the layer's inputs stay alive for the recompute: a
    forward pre-hook on each layer collects those.
    """
    weights, seen = model_storages(model), {}

    def keep(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()

    def layer_inputs(module, args, kwargs):
        for value in tree_flatten((args, kwargs))[0]:
            if torch.is_tensor(value):
                keep(value)

    layers = model.get_base_model().get_decoder().layers
    hooks = [layer.register_forward_pre_hook(layer_inputs, with_kwargs=True) for layer in layers]
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: keep(t) or t, lambda t: t), autocast(mode):
            logps = completion_logps(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    assert logps.requires_grad
    return sum(seen.values())


CASES = [(arch, gc, mode) for arch in CONFIGS for gc in (True, False) for mode in ("fp32", "bf16", "autocast")]


@pytest.mark.parametrize("arch,gradient_checkpointing,mode", CASES)
def test_saved_activations(model_dirs, arch, gradient_checkpointing, mode, monkeypatch):
    config = train_config(model_dirs[arch], gradient_checkpointing=gradient_checkpointing)
    model = load(config, monkeypatch, mode)
    measured = saved_activation_bytes(model, batch(), mode)
    predicted = estimate(config, arch, mode).activations
    assert close(measured, predicted, 0.15), f"measured {measured:,} predicted {predicted:,}"


def test_dropout_off_shares_adapter_inputs(model_dirs, monkeypatch):
    """Without dropout and without a dtype cast, q/k/v (and gate/up) adapters save one input between them."""
    config = train_config(model_dirs["llama"], gradient_checkpointing=False, lora_dropout=0.0)
    measured = saved_activation_bytes(load(config, monkeypatch), batch(), "fp32")
    assert close(measured, estimate(config, "llama").activations, 0.15)


# ---------------------------------------------------------------------- peak of a whole step
class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages created under the mode that are still alive, and their peak."""

    def __init__(self, ignore: set[int]):
        super().__init__()
        self.ignore, self.live, self.current, self.peak = ignore, {}, 0, 0

    def _free(self, key):
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if torch.is_tensor(t):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in self.ignore:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)
        return out


def step_peak(model, inputs, mode) -> int:
    """Peak live bytes over train.py's micro-step: policy forward, no-grad KL pass, backward."""

    def step():
        with autocast(mode):
            policy = completion_logps(model, inputs)
            with kto_model.no_grad_policy(model):
                kl = completion_logps(model, inputs)
        (policy - kl).sum().backward()

    step()  # warm-up: lazily created state is not part of a step
    for p in model.parameters():
        p.grad = None
    with LiveBytes(ignore=model_storages(model) | rows_storages(inputs)) as tracker:
        step()
    return tracker.peak


PEAK_CASES = [(arch, gc, mode) for arch in ("llama", "gemma2") for gc in (True, False) for mode in ("fp32", "autocast")]


@pytest.mark.parametrize("arch,gradient_checkpointing,mode", PEAK_CASES)
def test_step_peak(model_dirs, arch, gradient_checkpointing, mode, monkeypatch):
    config = train_config(model_dirs[arch], gradient_checkpointing=gradient_checkpointing)
    model = load(config, monkeypatch, mode)
    measured = step_peak(model, batch(), mode)
    e = estimate(config, arch, mode)
    predicted = e.activations + e.transient + e.gradients  # what the step allocates on top of the weights
    assert close(measured, predicted, 0.20), f"measured {measured:,} predicted {predicted:,}"


def test_step_peak_with_a_large_vocabulary(tmp_path, monkeypatch):
    """A 16k vocabulary on a narrow body: the (rows, V) log-prob chunk is the peak, as for real models."""
    from transformers import AutoModelForCausalLM

    shape = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=16384)
    AutoModelForCausalLM.from_config(shape).save_pretrained(tmp_path / "wide")
    config = TrainConfig(model=str(tmp_path / "wide"), batch_size=4, max_length=300, max_prompt_length=32).resolved()
    e = estimate_memory(config, shape.to_dict(), device="cpu")
    # the head's (rows, V) chunk is the peak: with grad (logprob_chunks) or in the no-grad KL pass right after
    assert e.transient == max(e.logprob_chunks, e.kl_pass) and e.logprob_chunks > 5 * e.recompute
    model = load(config, monkeypatch)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16384, (4, 300), generator=g)
    completion = torch.zeros(4, 300, dtype=torch.long)
    completion[:, 32:] = 1
    measured = step_peak(model, as_rows(ids, torch.ones(4, 300, dtype=torch.long), completion), "fp32")
    predicted = e.activations + e.transient + e.gradients
    assert close(measured, predicted, 0.20), f"measured {measured:,} predicted {predicted:,}"


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("mode", ["fp32", "autocast"])
def test_no_grad_pass_peak(tmp_path, arch, mode, monkeypatch):
    """The KL / reference / precompute passes: one layer at a time (a tiny vocabulary keeps the head small)."""
    from transformers import AutoModelForCausalLM

    shape = CONFIGS[arch]()
    shape.vocab_size = 64
    AutoModelForCausalLM.from_config(shape).save_pretrained(tmp_path / arch)
    config = train_config(tmp_path / arch)
    model = load(config, monkeypatch, mode)
    inputs = batch(vocab=64)

    def kl_pass():
        with autocast(mode), kto_model.no_grad_policy(model):
            completion_logps(model, inputs)

    kl_pass()
    with LiveBytes(ignore=model_storages(model) | rows_storages(inputs)) as tracker:
        kl_pass()
    predicted = estimate_memory(config, shape.to_dict(), device="cpu", autocast=mode == "autocast",
                                compute_dtype="float32" if mode == "fp32" else "bfloat16").kl_pass
    assert close(tracker.peak, predicted, 0.20), f"measured {tracker.peak:,} predicted {predicted:,}"


# ---------------------------------------------------------------------- arithmetic and API
@pytest.mark.parametrize("name,billions", [
    ("Qwen/Qwen2.5-0.5B-Instruct", 0.49), ("Qwen/Qwen2.5-1.5B-Instruct", 1.54), ("Qwen/Qwen2.5-7B-Instruct", 7.62),
    ("Qwen/Qwen2.5-32B-Instruct", 32.76), ("meta-llama/Llama-3.2-1B-Instruct", 1.24),
    ("meta-llama/Llama-3.2-3B-Instruct", 3.21), ("meta-llama/Llama-3.1-8B-Instruct", 8.03),
    ("meta-llama/Llama-3.1-70B-Instruct", 70.55), ("mistralai/Mistral-7B-Instruct-v0.3", 7.25),
    ("google/gemma-2-2b-it", 2.61),
])
def test_builtin_shapes_match_published_parameter_counts(name, billions):
    assert ModelShape.from_config(KNOWN_MODELS[name]).num_params() / 1e9 == pytest.approx(billions, abs=0.01)


def test_4bit_weights_cost_about_4_13_bits_per_linear_weight():
    config = TrainConfig(model="meta-llama/Llama-3.1-8B-Instruct")
    shape = ModelShape.from_config(KNOWN_MODELS[config.model])
    linear = shape.layers * sum(i * o for _, i, o in shape.linears())
    head_and_embeddings = 2 * shape.vocab * shape.hidden * 2
    weights = estimate_memory(config).weights - head_and_embeddings
    assert 8 * weights / linear == pytest.approx(4.127, abs=0.01)


def test_precomputed_reference_removes_the_reference_pass():
    on = estimate_memory(TrainConfig(model="Qwen/Qwen2.5-0.5B-Instruct"))
    off = estimate_memory(TrainConfig(model="Qwen/Qwen2.5-0.5B-Instruct", precompute_reference=False))
    assert on.reference_pass == 0 and off.reference_pass == off.kl_pass > 0


def test_forced_prompt_sharing_budgets_longer_rows():
    """share_prompts: true can put a prompt and two completions (up to 2 x max_length - max_prompt_length
    tokens) in one row; empty (auto) shares only rows that fit max_length, the budget as it was."""
    config = dict(model="Qwen/Qwen2.5-0.5B-Instruct", max_length=1024, max_prompt_length=512)
    auto, forced = estimate_memory(TrainConfig(**config)), estimate_memory(TrainConfig(**config, share_prompts=True))
    assert forced.activations > 1.4 * auto.activations and forced.description["max_length"] == 1024


def test_gradient_checkpointing_saves_memory_and_4bit_saves_weights():
    base = TrainConfig(model="meta-llama/Llama-3.2-3B-Instruct")
    no_gc = TrainConfig(model=base.model, gradient_checkpointing=False)
    full = TrainConfig(model=base.model, load_in_4bit=False)
    assert estimate_memory(no_gc).activations > 5 * estimate_memory(base).activations
    assert estimate_memory(full).weights > 2.5 * estimate_memory(base).weights  # embeddings stay 16-bit


def test_t4_computes_in_fp16():
    e = estimate_memory(TrainConfig(model="Qwen/Qwen2.5-0.5B-Instruct"), gpu_name="Tesla T4")
    assert e.description["compute_dtype"] == "float16"


def test_model_config_accepts_a_pretrained_config():
    config = train_config("unused")
    assert estimate_memory(config, CONFIGS["llama"]()).total == estimate_memory(config, CONFIGS["llama"]().to_dict()).total


def test_unknown_hub_model_asks_for_a_config_json():
    with pytest.raises(MemoryEstimateError, match="config.json"):
        estimate_memory(TrainConfig(model="someone/not-a-cached-model"))


def test_local_folder_config_is_read(model_dirs):
    config = train_config(model_dirs["llama"])
    assert estimate_memory(config).total == estimate_memory(config, CONFIGS["llama"]().to_dict()).total


def test_format_shows_the_breakdown_and_the_verdict():
    text = estimate_memory(TrainConfig(model="meta-llama/Llama-3.1-8B-Instruct")).format(budget_gb=24)
    for label in ("weights", "LoRA weights", "optimizer state", "activations", "log-prob chunks", "total", "fits"):
        assert label in text
    assert "<- peak" in text


def test_fit_plan_keeps_the_effective_batch_and_ends_fitting():
    config = TrainConfig(model="meta-llama/Llama-3.1-8B-Instruct", batch_size=16, gradient_accumulation_steps=2,
                         gradient_checkpointing=False, max_length=2048)
    plan = fit_plan(config, 12)
    assert plan and plan[-1][2].fits(12)
    totals = [est.total for _, _, est in plan]
    assert totals == sorted(totals, reverse=True)
    overrides = plan[-1][1]
    assert overrides["gradient_checkpointing"] is True
    assert overrides.get("batch_size", 16) * overrides.get("gradient_accumulation_steps", 2) == 32


def test_suggest_fit_when_it_fits_and_when_nothing_helps():
    assert suggest_fit(TrainConfig(model="Qwen/Qwen2.5-0.5B-Instruct"), 24) == []
    lines = suggest_fit(TrainConfig(model="meta-llama/Llama-3.1-8B-Instruct"), 4)
    assert "still does not fit" in lines[-1]


def test_cli(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: meta-llama/Llama-3.1-8B-Instruct\nbatch_size: 8\n")
    assert main([str(path), "--gpu-memory", "80"]) == 0
    assert "total (predicted peak)" in capsys.readouterr().out
    assert main([str(path), "--max_length", "4096", "--gpu", "Tesla T4"]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "fits with:" in out
    with pytest.raises(SystemExit) as e:  # argparse's usage error, with the did-you-mean
        main([str(path), "--bach_size", "2"])
    assert e.value.code == 2 and "did you mean --batch_size?" in capsys.readouterr().err
    assert main(["--model", "someone/not-cached", "--gpu-memory", "8"]) == 2  # a flag's value is not the config
    assert "config.json" in capsys.readouterr().err
    assert main([str(path), "--json"]) == 0
    assert '"total"' in capsys.readouterr().out
    assert estimate_memory(TrainConfig.load(path)).total < 24 * GIB


def test_cli_fsdp_is_per_process(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: Qwen/Qwen2.5-32B-Instruct\nfsdp: true\nbatch_size: 4\nmax_length: 1024\n")
    assert main([str(path)]) == 2  # how many processes share it is not in the config
    assert "--processes N" in capsys.readouterr().err
    assert main(["--model", "meta-llama/Llama-3.1-8B-Instruct", "--processes", "2"]) == 2
    assert "without --fsdp true" in capsys.readouterr().err
    assert main([str(path), "--processes", "2", "--gpu", "RTX 4090"]) == 0  # two 24 GB GPUs train it
    out = capsys.readouterr().out
    assert "per process" in out and "sharded over 2 processes" in out and "fits in" in out
    one, two = (estimate_memory(TrainConfig.load(path), processes=n) for n in (1, 2))
    assert not one.fits(23.6) and two.fits(23.6)  # where one does not
    assert two.weights + two.fsdp_gathered < 0.75 * one.weights  # its shards plus what it gathers
    assert two.activations == one.activations  # each process its own batch
