"""The run folder: a run's base is reloaded as training loaded it, and a dead run never blocks the next one.

The Hub is faked faithfully: a local Hub cache (HF_HUB_CACHE) holding one model at two commits, the
default branch and the tag `v1`, read with HF_HUB_OFFLINE=1 exactly as huggingface_hub reads a real one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import huggingface_hub.constants
import pytest
import torch
from tiny_models import learnable_rows, make_model_dir, write_jsonl

from kto_lite.config import TrainConfig
from kto_lite.errors import ConfigError
from kto_lite.runs import prepare_output_dir, run_base
from kto_lite.training.recipe import train

HUB_ID = "kto-test/tiny"
COMMITS = {"main": ("a" * 40, 0), "v1": ("b" * 40, 1)}  # revision -> (commit, seed of its random weights)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hub cache with HUB_ID at two commits: refs/main and refs/v1 name snapshots with different weights."""
    root = tmp_path_factory.mktemp("hub")
    repo = root / f"models--{HUB_ID.replace('/', '--')}"
    for revision, (commit, seed) in COMMITS.items():
        make_model_dir(repo / "snapshots" / commit, seed=seed)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
    return root


@pytest.fixture
def offline_hub(hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    return hub


def embedding(model) -> torch.Tensor:
    """The input embeddings (never adapted, never quantized): which commit's weights a model holds."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_input_embeddings().weight.detach().float().cpu()


def snapshot_embedding(hub, revision: str) -> torch.Tensor:
    from safetensors.torch import load_file

    commit = COMMITS[revision][0]
    weights = load_file(hub / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / commit / "model.safetensors")
    return weights["model.embed_tokens.weight"].float()


@pytest.fixture(scope="module")
def v1_run(hub, tmp_path_factory):
    """One training step on the tag v1 (unquantized, so the merges compare exactly)."""
    root = tmp_path_factory.mktemp("revision_run")
    write_jsonl(root / "train.jsonl", learnable_rows(16, seed=0))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
        out = train(TrainConfig(model=HUB_ID, revision="v1", load_in_4bit=False, data=str(root / "train.jsonl"),
                                output_dir=str(root / "run"), max_steps=1, batch_size=4, lora_r=4, max_length=64),
                    show_progress=False)
    return out


# ---------------------------------------------------------------------- a run's base, reloaded
def test_the_two_commits_differ(offline_hub):
    assert not torch.equal(snapshot_embedding(offline_hub, "main"), snapshot_embedding(offline_hub, "v1"))


def test_run_base_reads_the_runs_load_options(v1_run, offline_hub):
    run = run_base(v1_run)
    assert (run.name, run.revision, run.options["load_in_4bit"]) == (HUB_ID, "v1", False)
    assert run_base(v1_run, base="other/model").revision is None  # another base: the run's tag is not its


def test_merge_loads_the_revision_the_run_trained_on(v1_run, offline_hub):
    from kto_lite.export.merge import load_trained, merge

    expected = snapshot_embedding(offline_hub, "v1")
    torch.testing.assert_close(embedding(load_trained(v1_run)), expected, rtol=0, atol=0)
    merged = merge(v1_run, merge_from="full", dtype="fp32")
    torch.testing.assert_close(embedding(merged.model), expected, rtol=0, atol=0)


def test_chat_loads_the_revision_the_run_trained_on(v1_run, offline_hub):
    from kto_lite.feedback.chat import ChatModel

    chat = ChatModel(adapter=v1_run)
    torch.testing.assert_close(embedding(chat.base), snapshot_embedding(offline_hub, "v1"), rtol=0, atol=0)


def test_sampling_loads_the_revision_the_run_trained_on(v1_run, offline_hub):
    from kto_lite.generation import load_models, model_spec

    spec = model_spec(None, [str(v1_run)])
    assert spec.options["revision"] == "v1"
    loaded = load_models(spec)
    torch.testing.assert_close(embedding(loaded.model), snapshot_embedding(offline_hub, "v1"), rtol=0, atol=0)


# ---------------------------------------------------------------------- a run whose process died
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def killed_before_first_checkpoint(folder) -> None:
    """What a run killed (SIGKILL) during its reference pass leaves: status `running` with a dead pid, no checkpoint."""
    folder.mkdir(parents=True)
    (folder / "status.json").write_text(json.dumps({"status": "running", "phase": "reference log-probs",
                                                    "pid": dead_pid()}))
    (folder / "config.yaml").write_text("model: null\n")
    (folder / "data_report.json").write_text("{}")


def test_a_dead_run_without_checkpoint_is_replaced(tmp_path):
    killed_before_first_checkpoint(tmp_path / "run")
    assert prepare_output_dir(TrainConfig(output_dir=str(tmp_path / "run")).resolved()) is None
    assert list((tmp_path / "run").iterdir()) == []  # started over in the same folder, nothing moved aside
    assert not list(tmp_path.glob("run.old-*"))


def test_resuming_a_dead_run_without_checkpoint_starts_over(tmp_path, capsys):
    killed_before_first_checkpoint(tmp_path / "run")
    config = TrainConfig(output_dir=str(tmp_path / "run"), resume_from_checkpoint=True).resolved()
    assert prepare_output_dir(config) is None
    assert "nothing to resume" in capsys.readouterr().out
    assert list((tmp_path / "run").iterdir()) == []


def test_a_dead_run_with_a_checkpoint_is_kept_and_resumable(tmp_path):
    killed_before_first_checkpoint(tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 2, "processes": 1}))
    with pytest.raises(ConfigError, match=r"process .* is gone.*checkpoint-2.*--resume_from_checkpoint true"):
        prepare_output_dir(TrainConfig(output_dir=str(tmp_path / "run")).resolved())
    assert checkpoint.is_dir()
    config = TrainConfig(output_dir=str(tmp_path / "run"), resume_from_checkpoint=True).resolved()
    assert prepare_output_dir(config) == checkpoint


def test_a_live_run_is_never_touched(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "status.json").write_text(json.dumps({"status": "running", "pid": os.getpid()}))
    for resume in (False, True):
        with pytest.raises(ConfigError, match="has a run in progress"):
            prepare_output_dir(TrainConfig(output_dir=str(tmp_path / "run"), resume_from_checkpoint=resume).resolved())
    assert (tmp_path / "run" / "status.json").is_file()


def test_reference_cache_key_names_the_commit(offline_hub):
    """Two revisions of one Hub id with the same config: their reference log-probs are never mixed up."""
    from kto_lite.model import load_base
    from kto_lite.training.reference import model_fingerprint

    keys = {revision: model_fingerprint(load_base(HUB_ID, revision=revision, load_in_4bit=False), revision=revision)
            for revision in COMMITS}
    assert keys["main"] != keys["v1"]
