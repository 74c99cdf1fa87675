"""Loading a base model: precision by GPU generation, attention kernel, hub options, GGUF input.

No GPU is needed: each generation is simulated by replacing torch.cuda's answers (is_available,
get_device_capability, get_device_name). `is_bf16_supported` is made to say True everywhere, as it
does on a T4 through emulation, to prove it is never asked. `from_pretrained` is replaced by a
recorder where only its arguments matter; the GGUF conversion runs for real on a tiny model.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

import kto_lite.gguf_input as gguf_input
import kto_lite.model as kto_model
from kto_lite.errors import ConfigError, ModelNotFound
from kto_lite.memory import GPUS, find_gpu
from kto_lite.missing_model import not_found_reason
from kto_lite.model import (
    choose_attn_implementation,
    choose_precision,
    compute_dtype,
    load_base,
    load_tokenizer,
    precision_dtype,
    resolve_model,
)

# (name as torch.cuda.get_device_name says it, compute capability, what auto must choose)
GENERATIONS = {
    "V100": ("Tesla V100-SXM2-16GB", (7, 0), "fp16"),
    "T4": ("Tesla T4", (7, 5), "fp16"),
    "A100": ("NVIDIA A100-SXM4-80GB", (8, 0), "bf16"),
    "RTX 4090": ("NVIDIA GeForce RTX 4090", (8, 9), "bf16"),
    "H100": ("NVIDIA H100 80GB HBM3", (9, 0), "bf16"),
}
# Compute capability of every GPU in kto_lite.memory.GPUS (NVIDIA's CUDA GPU list).
CAPABILITY = {
    "T4": (7, 5), "V100": (7, 0), "RTX 3060 Ti": (8, 6), "RTX 3060": (8, 6), "RTX 3070": (8, 6),
    "RTX 3080": (8, 6), "RTX 3090": (8, 6), "RTX 4060 Ti": (8, 9), "RTX 4060": (8, 9), "RTX 4070": (8, 9),
    "RTX 4080": (8, 9), "RTX 4090": (8, 9), "A100": (8, 0), "H100": (9, 0), "A10": (8, 6), "L4": (8, 9),
}


def simulate(monkeypatch, gpu: str | None):
    """This process sees `gpu` (a GENERATIONS key), or no GPU at all (None)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation says yes: ignored
    if gpu is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        return
    name, capability, _ = GENERATIONS[gpu]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


# ----------------------------------------------------------------------------- precision
@pytest.mark.parametrize("gpu", GENERATIONS)
def test_auto_precision_by_compute_capability(monkeypatch, gpu):
    simulate(monkeypatch, gpu)
    expected = GENERATIONS[gpu][2]
    assert choose_precision() == choose_precision("auto") == expected
    assert compute_dtype() == precision_dtype(expected) == {"bf16": torch.bfloat16, "fp16": torch.float16}[expected]
    assert choose_precision("fp16") == "fp16" and choose_precision("no") == "no"


@pytest.mark.parametrize("gpu", ["V100", "T4"])
def test_bf16_below_ampere_is_refused(monkeypatch, gpu):
    simulate(monkeypatch, gpu)
    with pytest.raises(ConfigError, match=rf"8\.0 \(Ampere\).*{GENERATIONS[gpu][0]} has 7\.\d.*use fp16"):
        choose_precision("bf16")


@pytest.mark.parametrize("gpu", ["A100", "RTX 4090", "H100"])
def test_bf16_from_ampere_on(monkeypatch, gpu):
    simulate(monkeypatch, gpu)
    assert choose_precision("bf16") == "bf16"


def test_cpu_is_fp32_and_refuses_half_precision(monkeypatch):
    simulate(monkeypatch, None)
    assert choose_precision() == "no" and compute_dtype() == torch.float32
    for setting in ("bf16", "fp16"):
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            choose_precision(setting)
    with pytest.raises(ConfigError, match="one of auto, bf16, fp16, no"):
        choose_precision("fp8")


def test_memory_table_agrees_on_bf16():
    """kto_lite.memory's GPU table says bf16 exactly where choose_precision picks it."""
    assert set(CAPABILITY) == set(GPUS), "give the compute capability of every GPU in the table"
    for name, capability in CAPABILITY.items():
        assert find_gpu(name).bf16 == (capability >= kto_model.BF16_MIN_CAPABILITY), name


# ----------------------------------------------------------------------------- load_base's arguments
@pytest.fixture
def recorded(monkeypatch):
    """Replace from_pretrained by a recorder: load_base's arguments, no model."""
    calls = []

    class Model:
        config = type("Config", (), {})()

    def from_pretrained(source, **kwargs):
        calls.append({"source": source, **kwargs})
        return Model()

    monkeypatch.setattr(kto_model.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    return calls


@pytest.mark.parametrize("gpu", GENERATIONS)
def test_load_base_computes_in_the_chosen_precision(monkeypatch, recorded, gpu):
    simulate(monkeypatch, gpu)
    dtype = precision_dtype(GENERATIONS[gpu][2])
    load_base("org/model")
    load_base("org/model", load_in_4bit=False, precision="fp16")
    four_bit, unquantized = recorded
    assert four_bit["dtype"] == dtype and four_bit["quantization_config"].bnb_4bit_compute_dtype == dtype
    assert unquantized["dtype"] == torch.float16 and unquantized["quantization_config"] is None
    if GENERATIONS[gpu][2] == "fp16":
        with pytest.raises(ConfigError):
            load_base("org/model", precision="bf16")


def test_hub_options_reach_from_pretrained(monkeypatch, recorded, tmp_path):
    simulate(monkeypatch, None)
    load_base("org/model", revision="v1.0", trust_remote_code=True)
    load_base(str(tmp_path), revision="v1.0")  # a local folder has no revisions
    hub, local = recorded
    assert hub["revision"] == "v1.0" and hub["trust_remote_code"] is True
    assert "revision" not in local and local["trust_remote_code"] is False
    # the token: nothing is passed, so huggingface_hub reads HF_TOKEN or the saved login itself
    assert "token" not in hub and "use_auth_token" not in hub


@pytest.mark.parametrize(("gpu", "flash_installed", "expected"), [
    (None, True, "sdpa"),  # CPU
    ("T4", True, "sdpa"),  # flash-attention 2 needs Ampere or newer
    ("A100", False, "sdpa"),
    ("A100", True, "flash_attention_2"),
    ("H100", True, "flash_attention_2"),
])
def test_attention_kernel_by_default(monkeypatch, recorded, gpu, flash_installed, expected):
    simulate(monkeypatch, gpu)
    real_find_spec = kto_model.importlib.util.find_spec
    monkeypatch.setattr(kto_model.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" and flash_installed
                        else (None if name == "flash_attn" else real_find_spec(name, *a)))
    load_base("org/model")
    assert recorded[0]["attn_implementation"] == expected
    assert choose_attn_implementation(None, torch.float32) == "sdpa"  # fp32: never flash


def test_explicit_attention_kernel(monkeypatch, recorded):
    simulate(monkeypatch, None)
    load_base("org/model", attn_implementation="eager")
    assert recorded[0]["attn_implementation"] == "eager"
    assert choose_attn_implementation("kernels-community/flash-attn3", torch.bfloat16) == "kernels-community/flash-attn3"
    with pytest.raises(ConfigError, match=r"'flash2' is unknown; use one of eager, .*sdpa"):
        load_base("org/model", attn_implementation="flash2")


def test_model_without_sdpa_falls_back_to_eager(monkeypatch):
    """Custom-code models may lack SDPA; the automatic choice then uses eager, an explicit one fails."""
    simulate(monkeypatch, None)
    seen = []

    def from_pretrained(source, **kwargs):
        seen.append(kwargs["attn_implementation"])
        if kwargs["attn_implementation"] == "sdpa":
            raise ValueError("X does not support an attention implementation through "
                             "torch.nn.functional.scaled_dot_product_attention yet.")
        return type("M", (), {"config": type("C", (), {})()})()

    monkeypatch.setattr(kto_model.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    load_base("org/custom", trust_remote_code=True)
    assert seen == ["sdpa", "eager"]
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        load_base("org/custom", attn_implementation="sdpa")


# ----------------------------------------------------------------------------- GGUF input
def gguf_file(folder: Path, name: str = "model.Q4_K_M.gguf") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(gguf_input.MAGIC + b" not really")
    return path


def test_what_names_a_gguf_model(tmp_path):
    one = gguf_file(tmp_path / "one")
    assert gguf_input.gguf_source(str(one)) == one
    assert gguf_input.gguf_source(str(one.parent)) == one  # a folder with exactly one .gguf
    two = tmp_path / "two"
    gguf_file(two, "a.Q4_0.gguf"), gguf_file(two, "b.Q8_0.gguf")
    with pytest.raises(ConfigError, match=r"holds 2 \.gguf files \(a\.Q4_0\.gguf, b\.Q8_0\.gguf\); set model"):
        gguf_input.gguf_source(str(two))
    hf_folder = tmp_path / "hf"
    gguf_file(hf_folder)
    (hf_folder / "config.json").write_text("{}")
    assert gguf_input.gguf_source(str(hf_folder)) is None  # a transformers folder stays one
    assert gguf_input.gguf_source("HuggingFaceTB/SmolLM2-135M-Instruct") is None
    run = tmp_path / "run"  # a training run with an exported LoRA GGUF next to its adapter
    gguf_file(run, "adapter.gguf")
    (run / "adapter_config.json").write_text("{}")
    assert gguf_input.gguf_source(str(run)) is None
    blob = tmp_path / "blobs" / "sha256-3f2a"  # Ollama's store: GGUF files without the suffix
    gguf_file(blob.parent, blob.name)
    assert gguf_input.gguf_source(str(blob)) == blob
    (tmp_path / "notes.txt").write_text("not a model")
    assert gguf_input.gguf_source(str(tmp_path / "notes.txt")) is None
    with pytest.raises(FileNotFoundError, match="no such .gguf file"):
        gguf_input.gguf_source(str(tmp_path / "missing.gguf"))


def test_gguf_from_a_hub_repository(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []
    downloaded = gguf_file(tmp_path / "hub")

    def hf_hub_download(repo, filename, revision=None):
        calls.append((repo, filename, revision))
        return str(downloaded)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    name = "bartowski/Llama-3.2-1B-Instruct-GGUF/sub/Llama-3.2-1B-Instruct-Q4_K_M.gguf"
    assert gguf_input.gguf_source(name, revision="main") == downloaded
    assert calls == [("bartowski/Llama-3.2-1B-Instruct-GGUF", "sub/Llama-3.2-1B-Instruct-Q4_K_M.gguf", "main")]

    def offline(*a, **k):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(FileNotFoundError, match="not a file here, and the Hub did not give"):
        gguf_input.gguf_source(name)


@pytest.fixture
def fake_gguf_reader(monkeypatch, tmp_path):
    """transformers' GGUF reading replaced by a tiny Llama; counts conversions; `fail` breaks the save."""
    from tiny_models import make_model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = make_model_dir(tmp_path / "tiny")
    state = {"conversions": 0, "fail": False, "delay": 0.0}
    real_from_pretrained = AutoModelForCausalLM.from_pretrained

    def model_from_pretrained(folder, **kwargs):
        if "gguf_file" not in kwargs:  # loading the converted folder: the real thing
            return real_from_pretrained(folder, **kwargs)
        assert kwargs["quantization_config"].dequantize  # plain weights, never packed GGUF blocks
        state["conversions"] += 1
        time.sleep(state["delay"])
        model = real_from_pretrained(source)
        model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load leaves behind
        return model

    class Tokenizer:
        @staticmethod
        def from_pretrained(folder, *, gguf_file):
            tokenizer = AutoTokenizer.from_pretrained(source)
            if state["fail"]:
                def no_space(path):
                    raise OSError(28, "No space left on device")
                tokenizer.save_pretrained = no_space
            return tokenizer

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(gguf_input, "cache_root", lambda: tmp_path / "cache" / "gguf")
    monkeypatch.setattr(gguf_input, "_metadata_string", lambda path, key: state.get(key, "model"))
    import transformers
    monkeypatch.setattr(transformers, "AutoTokenizer", Tokenizer)
    return state


def test_gguf_is_converted_once_into_a_plain_folder(fake_gguf_reader, tmp_path):
    gguf = gguf_file(tmp_path / "models")
    folder = Path(resolve_model(str(gguf)))
    assert folder.parent == tmp_path / "cache" / "gguf" and folder.name.startswith("model.Q4_K_M-")
    assert resolve_model(str(gguf.parent)) == str(folder)  # the folder names the same file
    assert fake_gguf_reader["conversions"] == 1
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # de-quantized: a plain checkpoint
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert json.loads((folder / gguf_input.SOURCE_FILE).read_text())["gguf"] == str(gguf.resolve())


def test_a_changed_gguf_is_converted_again_and_the_old_copy_removed(fake_gguf_reader, tmp_path):
    gguf = gguf_file(tmp_path / "models")
    first = Path(resolve_model(str(gguf)))
    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file was replaced
    second = Path(resolve_model(str(gguf)))
    assert second != first and fake_gguf_reader["conversions"] == 2
    assert second.is_dir() and not first.exists()


def test_a_failed_conversion_leaves_nothing_behind(fake_gguf_reader, tmp_path):
    gguf = gguf_file(tmp_path / "models")
    fake_gguf_reader["fail"] = True
    with pytest.raises(OSError, match="set KTO_LITE_CACHE to a disk with room"):
        resolve_model(str(gguf))
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.endswith(".lock")] == []
    fake_gguf_reader["fail"] = False
    assert Path(resolve_model(str(gguf))).is_dir()  # the next try converts cleanly


def test_concurrent_loads_convert_once(fake_gguf_reader, tmp_path):
    """Several processes (torchrun ranks) or threads asking at once: one converts, the others wait."""
    gguf = gguf_file(tmp_path / "models")
    fake_gguf_reader["delay"] = 0.5
    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model(str(gguf)))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake_gguf_reader["conversions"] == 1 and len(set(results)) == 1 and len(results) == 3


def test_tokenizer_and_base_load_from_the_converted_folder(fake_gguf_reader, tmp_path):
    gguf = gguf_file(tmp_path / "models")
    tokenizer = load_tokenizer(str(gguf))
    model = load_base(str(gguf), load_in_4bit=False)
    assert Path(model.config._name_or_path) == Path(resolve_model(str(gguf)))
    assert tokenizer.pad_token_id is not None and fake_gguf_reader["conversions"] == 1


def test_memory_estimate_reads_a_gguf_models_config(fake_gguf_reader, tmp_path, monkeypatch):
    """`estimate --model x.gguf`: from the file's metadata before conversion, from the converted folder after."""
    from transformers import AutoConfig

    from kto_lite.memory import load_model_config

    gguf = gguf_file(tmp_path / "models")
    read, real_from_pretrained = [], AutoConfig.from_pretrained

    def from_pretrained(folder, **kwargs):
        if "gguf_file" not in kwargs:
            return real_from_pretrained(folder, **kwargs)
        read.append(kwargs["gguf_file"])
        return type("C", (), {"to_dict": lambda self: {"model_type": "llama", "from": "metadata"}})()

    monkeypatch.setattr(AutoConfig, "from_pretrained", from_pretrained)
    assert load_model_config(str(gguf))["from"] == "metadata" and read == [gguf.name]
    folder = Path(resolve_model(str(gguf)))
    assert load_model_config(str(gguf.parent)) == json.loads((folder / "config.json").read_text())
    assert read == [gguf.name]  # the converted folder answered


def test_a_lora_gguf_is_not_a_base_model(fake_gguf_reader, tmp_path):
    gguf = gguf_file(tmp_path / "models", "lora.gguf")
    fake_gguf_reader["general.type"] = "adapter"
    with pytest.raises(ConfigError, match="is a GGUF adapter, not a model"):
        resolve_model(str(gguf))
    assert fake_gguf_reader["conversions"] == 0


def test_metadata_of_a_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ConfigError, match="broken.gguf: not a readable GGUF file"):
        gguf_input._metadata_string(path, "general.type")


# ----------------------------------------------------------------------------- a model that cannot be found
def test_a_model_not_in_the_cache_of_an_offline_machine_is_named_with_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (load_tokenizer, load_base):
        with pytest.raises(ModelNotFound) as e:
            load("nobody/no-such-model")
        message = str(e.value)
        assert "model 'nobody/no-such-model' is not in the Hugging Face cache" in message
        assert "offline (HF_HUB_OFFLINE=1)" in message and "hf download nobody/no-such-model" in message


def test_a_missing_folder_and_a_folder_without_a_model_are_named(tmp_path):
    with pytest.raises(ModelNotFound, match=r"model './no/such/folder': no such folder or file"):
        load_tokenizer("./no/such/folder")
    with pytest.raises(ModelNotFound, match=r"is a folder, but not one transformers can load \(it has no config.json\)"):
        load_base(str(tmp_path))


def test_hub_answers_become_advice():
    """The Hub's own errors (raised online, simulated here) under the OSError transformers wraps them in."""
    from huggingface_hub import errors as hub_errors

    def wrapped(cause: Exception) -> OSError:
        try:
            raise OSError("transformers' message") from cause
        except OSError as e:
            return e

    gated = hub_errors.GatedRepoError.__new__(hub_errors.GatedRepoError)  # built without an HTTP response
    missing = hub_errors.RepositoryNotFoundError.__new__(hub_errors.RepositoryNotFoundError)
    assert "is gated on the Hugging Face Hub: accept its license" in not_found_reason("org/m", None, wrapped(gated))
    assert "the Hugging Face Hub has no model by that name" in not_found_reason("org/m", None, wrapped(missing))
    assert not_found_reason("org/m", None, OSError("disk full")) is None  # not about finding the model


def test_chat_with_a_missing_model_exits_2_naming_it(monkeypatch, capsys):
    from kto_lite.commands import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["chat", "--model", "nobody/no-such-model"]) == 2
    assert "error: model 'nobody/no-such-model' is not in the Hugging Face cache" in capsys.readouterr().err


def test_train_with_a_missing_model_fails_in_the_phase_that_loads_it(monkeypatch, tmp_path, capsys):
    from kto_lite.commands import main
    from kto_lite.runs import read_status

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "q", "completion": "a", "label": true}\n')
    assert main(["train", "--model", "nobody/no-such-model", "--data", str(data),
                 "--output_dir", str(tmp_path / "run")]) == 2
    assert "nobody/no-such-model" in capsys.readouterr().err
    status = read_status(tmp_path / "run")
    assert (status["status"], status["phase"]) == ("failed", "loading tokenizer and data")  # not "loading data"
    assert status["message"].startswith("ModelNotFound: model 'nobody/no-such-model'")
