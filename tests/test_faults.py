"""Faults tried on purpose: a full disk, damaged caches, and processes killed at the worst moments.

What must hold after each (docs/design.md, "nothing lost, nothing wrong"): a clear message naming the path
and what to do; the previous checkpoint, adapter and the user's data intact; never a half-written file under
a final name; a resumed run ends with the adapter an uninterrupted run gives. The long campaign of seeded
random kills is tests/kill_campaign.py.
"""

from __future__ import annotations

import errno

import pytest
import torch
from test_model_loading import fake_gguf_reader, gguf_file  # noqa: F401 - a fixture shared with those tests
from tiny_models import make_model_dir, make_training_dir

from kto_lite.config import TrainConfig
from kto_lite.files import DiskFullError, atomic_path
from kto_lite.model import add_lora, load_base
from kto_lite.training import reference
from kto_lite.training.reference import cached_reference_logps, compute_reference_logps, model_fingerprint

SEQS = [([1, 9, 10, 11], [12, 13, 2]), ([1, 14], [15, 16, 17, 18, 2]), ([1, 20, 21, 22, 23], [24, 2])]


def disk_full(after_bytes: int = 100):
    """A writer that puts `after_bytes` bytes in its file, then finds the disk full (what ENOSPC looks like)."""

    def write(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"x" * after_bytes)
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


def partials(folder) -> list:
    return [p.name for p in folder.rglob("*") if ".partial-" in p.name]


# ---------------------------------------------------------------------- a write that is whole or absent
def test_a_failed_write_leaves_the_previous_version_and_no_partial_file(tmp_path):
    target = tmp_path / "state.txt"
    target.write_text("previous")
    with pytest.raises(RuntimeError, match="writer died"), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("writer died")
    assert target.read_text() == "previous" and partials(tmp_path) == []


def test_a_full_disk_names_the_path_and_the_space_needed(tmp_path):
    target = tmp_path / "big.bin"
    target.write_text("previous")
    with pytest.raises(DiskFullError) as raised, atomic_path(target, needed=3 * 1024**3) as tmp:
        disk_full()(None, tmp)
    message = str(raised.value)
    assert str(target) in message and "needs about 3.00 GiB" in message and "free there" in message
    assert "is intact" in message and raised.value.needed == 3 * 1024**3 and raised.value.errno == errno.ENOSPC
    assert target.read_text() == "previous" and partials(tmp_path) == []


# ---------------------------------------------------------------------- the reference cache
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return add_lora(load_base(str(make_model_dir(tmp_path_factory.mktemp("ref") / "m"))), TrainConfig(lora_r=4))


def cached(model, cache_dir):
    return cached_reference_logps(model, SEQS, pad_token_id=0, batch_size=2, cache_dir=cache_dir,
                                  fingerprint=model_fingerprint(model), show_progress=False)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "values changed"])
def test_a_damaged_reference_cache_is_detected_and_recomputed(model, tmp_path, capsys, damage):
    fresh = cached(model, tmp_path)
    (path,) = (tmp_path / "reference").glob("*.pt")
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * len(data))
    else:  # a file that loads, with other numbers than the ones its checksum was taken of
        saved = torch.load(path)
        saved["values"] = saved["values"] + 1
        torch.save(saved, path)
    capsys.readouterr()
    again = cached(model, tmp_path)
    torch.testing.assert_close(again, fresh)
    lines = [line for line in capsys.readouterr().err.splitlines() if "reference" in line]
    assert len(lines) == 1 and str(path) in lines[0] and "recomputing" in lines[0], lines
    torch.testing.assert_close(cached(model, tmp_path), fresh)  # rewritten whole: read back without a word
    assert "recomputing" not in capsys.readouterr().err


def test_a_full_disk_while_caching_reference_logps_costs_only_the_cache(model, tmp_path, capsys, monkeypatch):
    """The values are computed: the run goes on (one line says the cache could not be kept), no partial file."""
    monkeypatch.setattr(reference.torch, "save", disk_full())
    values = cached(model, tmp_path)
    expected = compute_reference_logps(model, SEQS, pad_token_id=0, batch_size=1, show_progress=False)
    torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-5)
    err = capsys.readouterr().err
    assert "no space left" in err and str(tmp_path / "reference") in err
    assert list((tmp_path / "reference").iterdir()) == []


# ---------------------------------------------------------------------- a GGUF model's converted copy
@pytest.mark.parametrize("damage", ["truncated", "changed in place", "missing"])
def test_a_damaged_gguf_conversion_is_detected_and_converted_again(fake_gguf_reader, tmp_path, capsys,  # noqa: F811
                                                                   damage):
    from pathlib import Path

    from kto_lite.model import load_base, resolve_model

    gguf = gguf_file(tmp_path / "models")
    folder = Path(resolve_model(str(gguf)))
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "changed in place":  # same size: only the checksum can tell
        weights.write_bytes(data[:-64] + bytes(64))
    else:
        weights.unlink()
    capsys.readouterr()
    assert Path(resolve_model(str(gguf))) == folder and fake_gguf_reader["conversions"] == 2
    said = [line for line in capsys.readouterr().err.splitlines() if "its converted copy was damaged" in line]
    assert len(said) == 1 and said[0].startswith(f"converting {gguf.resolve()}"), said
    assert weights.read_bytes() == data and load_base(str(gguf), load_in_4bit=False) is not None
    resolve_model(str(gguf))
    assert fake_gguf_reader["conversions"] == 2 and "converting" not in capsys.readouterr().err  # whole again


# ---------------------------------------------------------------------- the built-in demo model
def test_the_shipped_demo_model_is_whole():
    """kto_lite/demo/model/SHA256SUMS matches the shipped files (recipes/build_demo_model.py rewrites it)."""
    from kto_lite.model import check_demo_model, resolve_model

    check_demo_model()
    assert resolve_model(None).endswith("model")


@pytest.mark.parametrize("damage", ["truncated", "changed in place", "missing"])
def test_a_damaged_demo_model_is_detected_and_how_to_restore_it_said(tmp_path, monkeypatch, damage):
    """It cannot be recomputed: the message names the file and the command that restores it, before transformers
    fails on it."""
    import shutil

    import kto_lite.model as kto_model
    from kto_lite.demo import DEMO_MODEL_DIR
    from kto_lite.errors import ConfigError

    copy = tmp_path / "model"
    shutil.copytree(DEMO_MODEL_DIR, copy)
    monkeypatch.setattr(kto_model, "DEMO_MODEL_DIR", copy)
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "changed in place":
        weights.write_bytes(data[:-64] + bytes(64))
    else:
        weights.unlink()
    with pytest.raises(ConfigError, match=r"model\.safetensors .*git checkout kto_lite/demo/model"):
        kto_model.load_base(None, load_in_4bit=False)


# ---------------------------------------------------------------------- a full disk during a run
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_training_dir(tmp_path_factory.mktemp("faults"))


def run_config(workdir, name, **kw):
    values = dict(model=str(workdir / "model"), data=str(workdir / "train.jsonl"), output_dir=str(workdir / name),
                  lora_r=4, batch_size=4, gradient_accumulation_steps=1, max_length=64, max_steps=4, save_steps=2,
                  warmup_ratio=0.0, seed=0)
    return TrainConfig(**{**values, **kw})


def adapter_weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def assert_same_adapter(a, b):
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def file_hash(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def uninterrupted(workdir):
    from kto_lite.training.recipe import train

    return train(run_config(workdir, "uninterrupted"), show_progress=False)


def full_disk_inside(monkeypatch, module, name: str, partial_prefix: str):
    """`module.name` (a save function) finds the disk full when it writes into a temporary folder starting with
    `partial_prefix` (atomic_path / atomic_files name them so), after writing 100 bytes."""
    real = getattr(module, name)

    def save(obj, path, *args, **kwargs):
        from pathlib import Path

        if Path(path).parent.name.startswith(partial_prefix):
            return disk_full()(obj, path)
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(module, name, save)


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(workdir, uninterrupted, monkeypatch):
    from kto_lite.runs import checkpoints, read_status
    from kto_lite.training.recipe import train

    data = file_hash(workdir / "train.jsonl")
    with monkeypatch.context() as m:
        full_disk_inside(m, torch, "save", ".checkpoint-4.partial")  # the optimizer state of the last checkpoint
        with pytest.raises(DiskFullError) as raised:
            train(run_config(workdir, "full_checkpoint", max_steps=6), show_progress=False)
    out = workdir / "full_checkpoint"
    message = str(raised.value)
    assert str(out / "checkpoints" / "checkpoint-4") in message and "needs about" in message and "free" in message
    status = read_status(out)
    assert status["status"] == "failed" and str(out / "checkpoints" / "checkpoint-4") in status["message"]
    assert [c.name for c in checkpoints(out)] == ["checkpoint-2"] and partials(out) == []
    assert torch.load(out / "checkpoints" / "checkpoint-2" / "training_state.pt", weights_only=False)["optimizer"]
    assert file_hash(workdir / "train.jsonl") == data
    # space freed: the run resumes from its checkpoint and ends as if nothing happened
    train(run_config(workdir, "full_checkpoint", max_steps=6, resume_from_checkpoint=True), show_progress=False)
    straight = train(run_config(workdir, "straight6", max_steps=6), show_progress=False)
    assert_same_adapter(adapter_weights(out), adapter_weights(straight))


def test_a_full_disk_while_writing_the_adapter_leaves_no_half_adapter(workdir, uninterrupted, monkeypatch):
    import peft.peft_model

    from kto_lite.runs import check_adapter_dir, read_status
    from kto_lite.training.recipe import train

    with monkeypatch.context() as m:
        full_disk_inside(m, peft.peft_model, "safe_save_file", ".files.partial")
        with pytest.raises(DiskFullError, match="needs about"):
            train(run_config(workdir, "full_adapter"), show_progress=False)
    out = workdir / "full_adapter"
    assert read_status(out)["status"] == "failed" and partials(out) == []
    assert not (out / "adapter_model.safetensors").exists() and not (out / "adapter_config.json").exists()
    with pytest.raises(FileNotFoundError, match="no adapter here"):
        check_adapter_dir(out)
    train(run_config(workdir, "full_adapter", resume_from_checkpoint=True), show_progress=False)  # the last checkpoint
    assert_same_adapter(adapter_weights(out), adapter_weights(uninterrupted))


def test_a_full_disk_while_saving_a_merged_model_leaves_nothing_at_its_path(workdir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kto_lite.export.adapter import save_merged
    from kto_lite.export.merge import Merged

    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    merged = Merged(model, AutoTokenizer.from_pretrained(workdir / "model"), str(workdir / "model"), "full", False)

    def save_pretrained(folder, *args, **kwargs):
        disk_full()(None, folder / "model.safetensors")

    monkeypatch.setattr(model, "save_pretrained", save_pretrained)
    with pytest.raises(DiskFullError, match=r"merged.*needs about 0\.\d+ MiB|merged.*needs about \d+ KiB"):
        save_merged(merged, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_writing_a_gguf_leaves_nothing_at_its_path(tmp_path, monkeypatch):
    import gguf
    from tiny_models import make_arch_model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kto_lite.export.gguf import write_gguf

    source = make_arch_model_dir(tmp_path / "src", "llama")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    out = tmp_path / "out" / "m.gguf"
    write_gguf(model, tokenizer, out)
    before = file_hash(out)

    def write_tensors(self, *args, **kwargs):
        self.fout[0].write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", write_tensors)
    with pytest.raises(DiskFullError, match=rf"{out}.*needs about"):
        write_gguf(model, tokenizer, out)
    assert file_hash(out) == before and partials(out.parent) == []  # the previous export, whole


# ---------------------------------------------------------------------- killed at a writer's worst moment (demo model)
@pytest.fixture(scope="module")
def demo_baseline(tmp_path_factory):
    """The demo run, uninterrupted (tests/kill_campaign.py's settings)."""
    import kill_campaign

    root = tmp_path_factory.mktemp("kills")
    result = kill_campaign.run(root / "baseline", root / "cache_baseline")
    assert result.returncode == 0, result.stderr[-2000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize(("kill_at", "outcome"), [
    ("checkpoint-2", "nothing to resume: started over"),  # before its first checkpoint exists
    ("checkpoint-4", "resumed from checkpoint-2"),  # in the middle of writing a checkpoint
    ("adapter_config.json", "resumed from checkpoint-6"),  # the final adapter's weights in place, its config not
])
def test_a_run_killed_while_writing_resumes_to_the_same_adapter(demo_baseline, kill_at, outcome):
    import random

    import kill_campaign

    record = kill_campaign.one_kill(demo_baseline, demo_baseline / "baseline", kill_campaign.REPO / "kto_lite" / "demo"
                                    / "data" / "demo_kto.jsonl", kill_at, random.Random(0), hash(kill_at) % 1000)
    assert record["returncode"] == -9, record  # it was killed where it was told to
    assert record["outcome"] == outcome and record["data_lost"] == [], record


def test_a_folder_replaced_by_a_killed_writer_comes_back(tmp_path):
    """Killed between moving a folder's previous version aside and renaming the new one into place: the next
    start puts the previous version back (the new one was never complete as far as anyone knows)."""
    from kto_lite.files import remove_partials

    (tmp_path / ".checkpoint-6.old-123").mkdir()
    (tmp_path / ".checkpoint-6.old-123" / "trainer_state.json").write_text('{"step": 6}')
    (tmp_path / ".checkpoint-6.partial-abc").mkdir()
    remove_partials(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6"]
    assert (tmp_path / "checkpoint-6" / "trainer_state.json").read_text() == '{"step": 6}'
