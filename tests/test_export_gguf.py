"""GGUF export, verified by reading the files back with other software.

- transformers' own GGUF loader (`from_pretrained(folder, gguf_file=...)`) loads the merged file: its
  logits equal the merged model's with the matrices rounded to fp16 (f16), or put through Q8_0 (q8_0);
  its tokenizer gives the same ids for a templated conversation.
- the LoRA file's tensors give back each module's update: alpha / r * B @ A == peft's delta.
- llama.cpp itself, when the `llama_cpp` package is installed (test_llama_cpp_runs_the_exports).
"""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from tiny_models import make_arch_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from kto_lite.commands import export as export_command
from kto_lite.demo import DEMO_MODEL_DIR
from kto_lite.errors import UnsupportedModel
from kto_lite.export.gguf import (
    ARCHITECTURES,
    _permute_qk,
    architecture,
    rope_freqs,
    write_gguf,
    write_lora_gguf,
)
from kto_lite.export.merge import merge
from kto_lite.export.modelfile import check_pieces, modelfile, turn_pieces
from kto_lite.files import umask

CONVERSATION = [{"role": "system", "content": "be short."},
                {"role": "user", "content": "what is the capital of france? 29 + 49"},
                {"role": "assistant", "content": "paris is the capital of france. 78"}]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _through(model, fn):
    """The model with every matrix passed through fn (what the GGUF stores), vectors as they are."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(fn(p))
    return model


def _load_gguf(path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _ids(tokenizer, messages=CONVERSATION):
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """model_type -> a tiny random model folder (byte-level BPE tokenizer with a chat template)."""
    root = tmp_path_factory.mktemp("arch")
    return {t: make_arch_model_dir(root / f"tiny-{t}", t) for t in ARCHITECTURES}


# --------------------------------------------------------------------------- merged model


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_f16_gguf_loads_back_as_the_same_model(tiny, model_type, tmp_path):
    src = tiny[model_type]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src)
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", quant="f16")
    loaded, loaded_tokenizer = _load_gguf(path)
    conversation = CONVERSATION[1:] if model_type == "gemma2" else CONVERSATION
    ids = _ids(tokenizer, conversation)
    assert _ids(loaded_tokenizer, conversation) == ids  # the tokenizer and chat template round-trip
    rounded = _through(model, lambda w: w.half().float())
    assert torch.allclose(_logits(loaded, ids), _logits(rounded, ids), atol=1e-5, rtol=0)  # exact up to fp16
    meta = gguf.GGUFReader(str(path))
    assert meta.fields["general.architecture"].contents() == ARCHITECTURES[model_type].gguf_name
    assert meta.fields["tokenizer.chat_template"].contents() == tokenizer.chat_template


def test_q8_0_gguf_is_the_model_through_q8_0(tiny, tmp_path):
    src = tiny["llama"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src)
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", quant="q8_0")
    loaded, _ = _load_gguf(path)
    ids = _ids(tokenizer)
    q8 = gguf.GGMLQuantizationType.Q8_0

    def through_q8(w):
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), q8), q8).copy())

    exact = _logits(model, ids)
    expected = _logits(_through(model, through_q8), ids)
    assert torch.allclose(_logits(loaded, ids), expected, atol=1e-4, rtol=0)
    assert (expected - exact).abs().max() < 0.05 * exact.abs().max()  # Q8_0's own error is small
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == q8 and types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert path.stat().st_size < 0.6 * write_gguf(model, tokenizer, tmp_path / "f.gguf").stat().st_size


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModel, match=r"gemma2, llama, mistral, qwen2; this model is 'gpt2'"):
        architecture(GPT2Config())


def test_llama3_rope_becomes_llama_cpp_rope_freqs():
    """llama.cpp divides rotary frequency i by rope_freqs[i]: that must give transformers' llama3 frequencies."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 1024})
    factors = torch.from_numpy(rope_freqs(config)).double()
    base = 1.0 / 500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    assert torch.allclose(base / factors, expected.double(), rtol=1e-6)
    assert factors[0] == 1.0 and factors[-1] == 8.0  # high frequencies kept, low ones stretched
    assert rope_freqs(LlamaConfig()) is None


# --------------------------------------------------------------------------- the adapter alone


def _adapter(src, out, **lora):
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(target_modules="all-linear", **lora))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(out)
    return model


@pytest.mark.parametrize("lora", [dict(r=4, lora_alpha=8), dict(r=4, lora_alpha=8, use_rslora=True),
                                  dict(r=4, lora_alpha=16, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 4})],
                         ids=["plain", "rslora", "patterns"])
def test_lora_gguf_reproduces_every_modules_update(tiny, tmp_path, lora):
    src = tiny["llama"]
    peft_model = _adapter(src, tmp_path / "adapter", **lora)
    config = peft_model.get_base_model().config
    path = write_lora_gguf(tmp_path / "adapter", tmp_path / "lora.gguf", config)
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}  # numpy order: (rows, cols)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    checked = 0
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        hf = name.removeprefix("base_model.model.")
        key = name_map.get_name(hf) + ".weight"
        a, b = tensors[key + ".lora_a"], tensors[key + ".lora_b"]  # (r, in), (out, r)
        delta = module.get_delta_weight("default")  # what peft adds: (out, in)
        if hf.endswith("q_proj"):
            delta = _permute_qk(delta, config.num_attention_heads)
        elif hf.endswith("k_proj"):
            delta = _permute_qk(delta, config.num_key_value_heads)
        assert torch.allclose(b @ a * (alpha / a.shape[0]), delta, atol=1e-6), hf
        checked += 1
    assert checked == 2 * 7  # 2 layers x (q k v o gate up down)


def test_lora_gguf_refuses_dora(tiny, tmp_path):
    src = tiny["llama"]
    _adapter(src, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True)
    config = AutoModelForCausalLM.from_pretrained(src).config
    with pytest.raises(UnsupportedModel, match="DoRA"):
        write_lora_gguf(tmp_path / "dora", tmp_path / "x.gguf", config)
    assert not list(tmp_path.glob("*.gguf*"))


# --------------------------------------------------------------------------- the command, on the demo model


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A run folder on the demo model: a LoRA adapter with random B, config.yaml naming the demo data."""
    from kto_lite.demo import DEMO_SAMPLES

    root = tmp_path_factory.mktemp("demo_gguf")
    run = root / "demo-run"
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(run)
    AutoTokenizer.from_pretrained(DEMO_MODEL_DIR).save_pretrained(run)
    data = next(iter(DEMO_SAMPLES.values()))
    (run / "config.yaml").write_text(yaml.safe_dump({"model": None, "load_in_4bit": True, "data": str(data)}))
    return run


def test_cli_gguf_writes_the_quantized_merge_a_modelfile_and_the_commands(demo_run, capsys):
    assert export_command.main(["--adapter", str(demo_run), "--gguf", "--drift_rows", "4"]) == 0
    out = capsys.readouterr().out
    path = demo_run / "gguf" / "demo-run-quantized-f16.gguf"
    assert path.is_file() and (path.stat().st_mode & 0o777) == 0o666 & ~umask()
    assert "mean |Δ log p| per token vs the trained model (4 rows" in out
    assert re.search(r"quantized (<0\.0001|0\.000\d), full 0\.\d+", out)  # the faithful merge is the trained model
    assert f"llama-cli -m {path}" in out and "ollama create demo-run -f" in out
    loaded, tokenizer = _load_gguf(path)
    merged = merge(demo_run, merge_from="quantized", dtype="fp16")
    ids = _ids(tokenizer)
    assert ids == _ids(AutoTokenizer.from_pretrained(demo_run))
    assert torch.allclose(_logits(loaded, ids), _logits(merged.model.float(), ids), atol=1e-5, rtol=0)
    mf = path.with_suffix(".Modelfile").read_text()
    assert f"FROM ./{path.name}" in mf and "TEMPLATE" in mf and 'PARAMETER stop "<|end|>"' in mf


def test_cli_gguf_lora_without_a_base_gguf_explains_what_is_missing(demo_run, tmp_path, capsys):
    out_file = tmp_path / "adapter.gguf"
    assert export_command.main(["--adapter", str(demo_run), "--gguf_lora", "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert out_file.is_file() and "--base_gguf" in out and not out_file.with_suffix(".Modelfile").exists()
    base = tmp_path / "base.gguf"
    write_gguf(AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR), AutoTokenizer.from_pretrained(DEMO_MODEL_DIR), base)
    assert export_command.main(["--adapter", str(demo_run), "--gguf_lora", "--out", str(out_file), "--base_gguf", str(base)]) == 0
    mf = out_file.with_suffix(".Modelfile").read_text()
    assert f"FROM {base.resolve()}" in mf and "ADAPTER ./adapter.gguf" in mf
    assert f"llama-cli -m {base} --lora {out_file}" in capsys.readouterr().out


def test_cli_refuses_an_unsupported_model_with_exit_2(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(base)
    run = tmp_path / "run"
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["c_attn"]))
    peft.save_pretrained(run)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(base), "load_in_4bit": False}))
    assert export_command.main(["--adapter", str(run), "--gguf"]) == 2
    assert "'gpt2'" in capsys.readouterr().err
    assert not (run / "gguf").exists()


# --------------------------------------------------------------------------- Modelfile templates

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
         "{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "<start_of_turn>{{ role }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
DATED = ("{% for m in messages %}{% if loop.index0 == 0 %}Today: {{ strftime_now('%d %b %Y') }}\n{% endif %}"
         "{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}")


@pytest.mark.parametrize("template,expressible", [(CHATML, True), (LLAMA3, True), (GEMMA, True), (DATED, False)],
                         ids=["chatml", "llama3", "gemma", "dated-uppercase"])
def test_modelfile_template_reproduces_the_chat_template_or_says_it_cannot(template, expressible):
    from conftest import build_tokenizer

    tokenizer = build_tokenizer(template, eos_token="<|end|>")
    pieces = turn_pieces(tokenizer)
    assert (pieces is not None and check_pieces(tokenizer, pieces)) == expressible
    text, ok = modelfile("./m.gguf", tokenizer)
    assert ok == expressible and ("TEMPLATE \"\"\"" in text) == expressible
    assert ("TEMPLATE left out" in text) != expressible and 'PARAMETER stop "<|end|>"' in text
    if template is GEMMA:
        assert '"system"' not in text and "<start_of_turn>model" in text


def test_default_system_prompt_becomes_ollamas_system(tmp_path):
    from conftest import build_tokenizer

    template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
                + CHATML)
    tokenizer = build_tokenizer(template)
    text, ok = modelfile("./m.gguf", tokenizer)
    assert ok and 'SYSTEM """You are helpful."""' in text


def test_gguf_of_a_base_trained_from_gguf_keeps_its_tokenizer(tiny, tmp_path):
    src = tiny["qwen2"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    first = write_gguf(model, AutoTokenizer.from_pretrained(src), tmp_path / "base.gguf")
    second = write_gguf(model, AutoTokenizer.from_pretrained(src), tmp_path / "again.gguf", base_gguf=str(first))
    keys = {k: f.contents() for k, f in gguf.GGUFReader(str(first)).fields.items() if k.startswith("tokenizer.")}
    again = {k: f.contents() for k, f in gguf.GGUFReader(str(second)).fields.items() if k.startswith("tokenizer.")}
    assert keys == again and keys["tokenizer.ggml.merges"] and keys["tokenizer.ggml.pre"] == "qwen2"  # transformers gives qwen2 models its split


# --------------------------------------------------------------------------- llama.cpp itself


def llama_cpp_logits(path, text: str, ids: list[int], **kwargs) -> torch.Tensor:
    """llama.cpp's logits for `ids` (after checking it tokenizes `text` into exactly those ids): (T, V)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=1, **kwargs)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[:len(ids)]))
    finally:
        llm.close()


def test_llama_cpp_runs_the_exports(demo_run, tmp_path):
    """llama.cpp (llama-cpp-python) tokenizes like transformers and computes the same logits, for the merged
    file and for base GGUF + LoRA GGUF. Skipped when llama-cpp-python is not installed (it builds llama.cpp
    from source: see docs/export.md)."""
    pytest.importorskip("llama_cpp")
    tokenizer = AutoTokenizer.from_pretrained(demo_run)
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    merged = merge(demo_run, merge_from="quantized", dtype="fp16")
    path = write_gguf(merged.model, merged.tokenizer, tmp_path / "merged.gguf")
    got, expected = llama_cpp_logits(path, text, ids), _logits(merged.model.float(), ids)
    assert (got - expected).abs().max() < 0.05 and (got.argmax(-1) == expected.argmax(-1)).all()

    base = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32)
    base_path = write_gguf(base, tokenizer, tmp_path / "base.gguf")
    lora_path = write_lora_gguf(demo_run, tmp_path / "lora.gguf", base.config)
    got = llama_cpp_logits(base_path, text, ids, lora_path=str(lora_path))
    full = merge(demo_run, merge_from="full", dtype="fp16").model.float()
    assert (got - _logits(full, ids)).abs().max() < 0.05  # base + LoRA at run time == the full merge
    assert (got - _logits(base, ids)).abs().max() > 1.0  # and the adapter did change the model


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_llama_cpp_reads_every_architecture(tiny, model_type, tmp_path):
    """The architecture mapping and the tokenizer names (gpt-2, qwen2 pre-tokenizers) as llama.cpp reads them."""
    pytest.importorskip("llama_cpp")
    src = tiny[model_type]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src)
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf")
    conversation = CONVERSATION[1:] if model_type == "gemma2" else CONVERSATION
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = _logits(_through(model, lambda w: w.half().float()), ids)
    got = llama_cpp_logits(path, text, ids)
    assert (got - expected).abs().max() < 0.02 * expected.abs().max() + 1e-3, model_type


@pytest.mark.real_model
def test_smollm2_gguf_runs_in_llama_cpp(tmp_path):
    """The real model (SmolLM2-135M-Instruct, as a transformers folder): f16 GGUF in llama.cpp, its Modelfile."""
    pytest.importorskip("llama_cpp")
    from real_model import smollm2_dir

    src = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src)
    path = write_gguf(model, tokenizer, tmp_path / "smollm2.gguf")
    conversation = [{"role": "user", "content": "What is 29 + 49? Answer in two words."},
                    {"role": "assistant", "content": "It's 78."}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    got, expected = llama_cpp_logits(path, text, ids), _logits(model, ids)
    assert (got - expected).abs().max() < 0.25 and (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.95
    text, ok = modelfile(f"./{path.name}", tokenizer)
    assert ok and 'SYSTEM """You are a helpful AI assistant named SmolLM' in text and "<|im_start|>" in text


def test_gguf_lora_of_a_run_trained_from_a_gguf_uses_that_file_as_base(demo_run, tmp_path, capsys):
    """GGUF in, aligned GGUF out: the run's `model` is a .gguf file; the Modelfile applies the adapter to it."""
    import shutil

    base = write_gguf(AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR), AutoTokenizer.from_pretrained(DEMO_MODEL_DIR),
                      tmp_path / "demo-base.gguf")
    run = tmp_path / "from-gguf"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("gguf"))
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(base), "load_in_4bit": True}))
    assert export_command.main(["--adapter", str(run), "--gguf_lora"]) == 0
    out = capsys.readouterr().out
    assert f"trained from {base}" in out and "GGUF in, aligned GGUF out" in out
    modelfile_text = (run / "gguf" / "from-gguf-lora.Modelfile").read_text()
    assert f"FROM {base.resolve()}" in modelfile_text and "ADAPTER ./from-gguf-lora.gguf" in modelfile_text
    assert "TEMPLATE" in modelfile_text
