"""Export: the zip's contents, the two merges (into the de-quantized 4-bit weights, into full precision), the CLI."""

import contextlib
import io
import json
import os
import re
import zipfile

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from test_chat import make_adapter_run
from tiny_models import make_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from kto_lite.commands import export as export_command
from kto_lite.export.adapter import estimate_merge_memory, load_snippet, merge_adapter, zip_adapter

RUN_RECORD = ["config.yaml", "metrics.jsonl", "data_report.json", "status.json"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("export") / "base")


@pytest.fixture(scope="module")
def run(base_dir):
    """An adapter folder laid out like a training run's output_dir, with things a zip must leave out."""
    run = make_adapter_run(base_dir.parent, base_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(run)
    for name in RUN_RECORD[1:]:
        (run / name).write_text("{}\n")
    (run / "feedback.jsonl").write_text('{"prompt": "a", "completion": "b", "label": true}\n')
    (run / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-1" / "optimizer.pt").write_bytes(b"0" * 1000)
    return run


@pytest.fixture(scope="module")
def merged(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "model"  # exists and is empty: allowed
    return merge_adapter(run, out, merge_from="full")


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_zip_holds_adapter_tokenizer_and_run_record_only(run, tmp_path):
    out = zip_adapter(run, tmp_path / "out" / "adapter.zip")
    names = zipfile.ZipFile(out).namelist()
    assert all(n.startswith("run/") for n in names)
    files = {n.removeprefix("run/") for n in names}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            *RUN_RECORD} <= files
    assert not any("checkpoint" in f or "feedback" in f for f in files)
    zipfile.ZipFile(out).extractall(tmp_path / "unzipped")
    assert (tmp_path / "unzipped" / "run" / "adapter_model.safetensors").read_bytes() == \
        (run / "adapter_model.safetensors").read_bytes()
    assert not list(out.parent.glob("*.partial"))


def test_merged_model_equals_base_plus_adapter(run, base_dir, merged):
    ids = torch.tensor([[1, 11, 12, 30, 31, 32, 40]])
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), run)
    expected = logits(with_adapter, ids)
    reloaded = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert torch.allclose(logits(reloaded, ids), expected, atol=1e-4, rtol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    assert not torch.allclose(logits(base, ids), expected, atol=1e-2)  # the adapter did change the model
    files = {p.name for p in merged.iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files and "adapter_config.json" not in files
    with safe_open(merged / "model.safetensors", "pt") as f:
        assert not any("lora" in k for k in f.keys())
    assert not list(merged.parent.glob(".*partial*"))


def test_merge_in_fp16_and_bad_dtype(run, tmp_path):
    out = merge_adapter(run, tmp_path / "fp16", dtype="fp16")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    with pytest.raises(ValueError, match="dtype"):
        merge_adapter(run, tmp_path / "bad", dtype="int3")


def test_merge_refuses_a_non_empty_folder(run, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        merge_adapter(run, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_estimate_merge_memory_counts_parameters(base_dir):
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base_dir).parameters())
    assert estimate_merge_memory(str(base_dir)) == int(n * 4 * 1.2)  # fp32 on CPU
    assert estimate_merge_memory(str(base_dir), "bf16") == int(n * 2 * 1.2)


def _run_snippet(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code.replace("max_new_tokens=128", "max_new_tokens=5"), {})
    return out.getvalue()


def test_load_snippets_run(run, base_dir, merged):
    adapter_code = load_snippet(run, "adapter")
    assert repr(str(base_dir)) in adapter_code and "PeftModel.from_pretrained" in adapter_code
    assert _run_snippet(adapter_code).strip()
    merged_code = load_snippet(merged, "merged")
    assert "AutoModelForCausalLM.from_pretrained" in merged_code and "peft" not in merged_code
    assert _run_snippet(merged_code).strip()
    with pytest.raises(ValueError):
        load_snippet(run, "gguf")


def test_cli_zip_merge_and_errors(run, tmp_path, capsys):
    assert export_command.main(["--adapter", str(run), "--zip", str(tmp_path / "a.zip")]) == 0
    assert zipfile.is_zipfile(tmp_path / "a.zip")
    assert export_command.main(["--adapter", str(run), "--merge", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "llama"
    out = capsys.readouterr().out
    assert "of RAM" in out and "AutoModelForCausalLM.from_pretrained" in out and "merge_from quantized" in out
    assert "0.0 GiB" not in out and re.search(r"about \d+ (KiB|MiB) of RAM", out)  # a tiny model: not "0.0 GiB"
    # usage and input errors exit 2 (cli.run)
    assert export_command.main(["--adapter", str(run), "--merge", str(tmp_path / "m")]) == 2  # not empty now
    assert export_command.main(["--adapter", str(tmp_path / "nothing"), "--zip", str(tmp_path / "b.zip")]) == 2
    assert "adapter_config.json is missing" in capsys.readouterr().err
    assert export_command.main(["--adapter", str(run)]) == 2  # nothing to export chosen
    assert "choose what to export" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        export_command.main(["--adapter", str(run), "--merge_from", "half"])
    assert e.value.code == 2


def test_full_merge_refuses_a_quantized_base(run, base_dir, tmp_path):
    from kto_lite.model import load_base

    load_base(str(base_dir), load_in_4bit=True).save_pretrained(tmp_path / "base4")  # a "-bnb-4bit" checkpoint
    with pytest.raises(ValueError, match="full-precision"):
        merge_adapter(run, tmp_path / "out", base=str(tmp_path / "base4"), merge_from="full")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the two merges


def test_quantized_merge_reproduces_the_trained_4bit_model_and_full_drifts(run, tmp_path):
    """The adapter was trained on NF4 weights: adding it to dequant(NF4(W)) gives the trained model back."""
    from kto_lite.export.merge import load_trained, logprob_drift, merge, token_logps

    ids = [([1, 11, 12, 30, 31, 32, 40, 41, 42, 43], 3), ([1, 13, 14, 50, 51, 52, 53], 2)]
    trained = load_trained(run)  # 4-bit base + adapter, as training had it (config.yaml: load_in_4bit true)
    assert type(trained.get_base_model().model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    reference = token_logps(trained, ids)
    quantized = merge(run, merge_from="quantized", dtype="fp32", trained=trained)
    full = merge(run, merge_from="full", dtype="fp32")
    assert type(quantized.model.model.layers[0].mlp.up_proj).__name__ == "Linear"  # plain again, saved as such
    assert quantized.model.config.to_dict().get("quantization_config") is None
    drift_q = logprob_drift(reference, token_logps(quantized.model, ids))
    drift_f = logprob_drift(reference, token_logps(full.model, ids))
    assert drift_q < 1e-5  # fp32: the same model up to summation order
    assert drift_f > 100 * drift_q  # the full merge meets weights the adapter never saw
    out = merge_adapter(run, tmp_path / "q", dtype="fp32")  # merge_from defaults to quantized for a 4-bit run
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert logprob_drift(reference, token_logps(reloaded, ids)) < 1e-5


def test_a_run_trained_unquantized_has_only_the_full_merge(run, tmp_path):
    import shutil

    import yaml

    from kto_lite.export.merge import resolve_merge_from

    plain = tmp_path / "plain"
    shutil.copytree(run, plain)
    (plain / "config.yaml").write_text(yaml.safe_dump({**yaml.safe_load((run / "config.yaml").read_text()),
                                                      "load_in_4bit": False}))
    assert resolve_merge_from(plain, None) == "full" and resolve_merge_from(plain, "quantized") == "full"
    assert resolve_merge_from(run, None) == "quantized" and resolve_merge_from(run, "full") == "full"
    with pytest.raises(ValueError, match="merge_from"):
        resolve_merge_from(run, "half")


def test_files_the_user_receives_follow_the_umask(run, tmp_path):
    """The zip is 0644 and the merged folder 0755 under umask 022, as any file the user makes (temporary
    files start 0600 / 0700: mkstemp, mkdtemp)."""
    old = os.umask(0o022)
    try:
        zipped = zip_adapter(run, tmp_path / "a.zip")
        folder = merge_adapter(run, tmp_path / "m", merge_from="full")
    finally:
        os.umask(old)
    assert zipped.stat().st_mode & 0o777 == 0o644
    assert folder.stat().st_mode & 0o777 == 0o755
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_the_drift_check_reads_the_runs_data_with_its_own_column_names(run, base_dir, tmp_path):
    """A run trained with `columns` (its data has other column names): the drift rows are its rows, read with
    that mapping, not a data error."""
    import shutil

    import yaml

    from kto_lite.export.merge import drift_rows

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    data = tmp_path / "renamed.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "reply": f"a{i}", "ok": i % 2 == 0}) + "\n"
                            for i in range(4)))
    settings = yaml.safe_load((copy / "config.yaml").read_text())
    settings.update(data=str(data), columns={"question": "prompt", "reply": "completion", "ok": "label"})
    (copy / "config.yaml").write_text(yaml.safe_dump(settings))
    rows = drift_rows(copy, AutoTokenizer.from_pretrained(base_dir), n=3)
    assert len(rows) == 3 and all(0 < prompt_length < len(ids) for ids, prompt_length in rows)


def test_a_gguf_export_whose_base_is_gone_says_which_model_and_what_to_do(run, tmp_path, capsys, monkeypatch):
    import shutil

    import yaml

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "config.yaml").write_text(yaml.safe_dump({"model": "no-such-org/no-such-model", "load_in_4bit": True}))
    assert export_command.main(["--adapter", str(copy), "--gguf"]) == 2
    err = capsys.readouterr().err
    assert "model 'no-such-org/no-such-model' is not in the Hugging Face cache" in err and "HF_HUB_OFFLINE=1" in err
    assert not list(copy.glob("*.gguf"))
