"""Cached reference log-probs: equal to fresh ones, reused when nothing changed, rebuilt when anything did."""

import pytest
import torch
from tiny_models import make_model_dir

from kto_lite.config import TrainConfig
from kto_lite.model import add_lora, load_base
from kto_lite.training import reference
from kto_lite.training.reference import cached_reference_logps, compute_reference_logps, model_fingerprint

SEQS = [([1, 9, 10, 11], [12, 13, 2]), ([1, 14], [15, 16, 17, 18, 2]), ([1, 20, 21, 22, 23], [24, 2])]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    a = add_lora(load_base(str(make_model_dir(root / "a", seed=0))), TrainConfig(lora_r=4))
    b = add_lora(load_base(str(make_model_dir(root / "b", seed=1))), TrainConfig(lora_r=4))
    return a, b


def run(model, seqs, cache_dir):
    return cached_reference_logps(model, seqs, pad_token_id=0, batch_size=2, cache_dir=cache_dir,
                                  fingerprint=model_fingerprint(model), show_progress=False)


def test_cached_equals_fresh_and_is_reused(models, tmp_path, monkeypatch):
    model = models[0]
    first = run(model, SEQS, tmp_path)
    fresh = compute_reference_logps(model, SEQS, pad_token_id=0, batch_size=1, show_progress=False)
    torch.testing.assert_close(first, fresh, rtol=1e-5, atol=1e-5)  # batching/padding does not change them
    assert len(list((tmp_path / "reference").glob("*.pt"))) == 1

    def fail(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(reference, "compute_reference_logps", fail)
    torch.testing.assert_close(run(model, SEQS, tmp_path), first)


def test_cache_is_rebuilt_when_model_data_or_lengths_change(models, tmp_path):
    a, b = models
    run(a, SEQS, tmp_path)
    run(b, SEQS, tmp_path)  # another model
    run(a, SEQS[:2] + [([1, 20, 21, 22, 23], [24, 25, 2])], tmp_path)  # data changed
    run(a, [(p, c[:2]) for p, c in SEQS], tmp_path)  # a shorter max_length cuts completions
    assert len(list((tmp_path / "reference").glob("*.pt"))) == 4


def test_fingerprint_ignores_adapters_but_sees_weights(models, tmp_path):
    a, b = models
    before = model_fingerprint(a)
    for n, p in a.named_parameters():
        if "lora_B" in n:
            p.data.normal_()  # training the adapter does not change the reference
    assert model_fingerprint(a) == before
    assert model_fingerprint(b) != before
    path = make_model_dir(tmp_path / "m", seed=0)
    first = model_fingerprint(load_base(str(path)))
    assert model_fingerprint(load_base(str(path))) == first  # reloading: same
    make_model_dir(path, seed=5)  # the model rebuilt in place: new weights, same name
    assert model_fingerprint(load_base(str(path))) != first
    assert model_fingerprint(load_base(str(path), load_in_4bit=False)) != model_fingerprint(load_base(str(path)))


@pytest.mark.parametrize("library", ["torch", "transformers", "bitsandbytes"])
def test_fingerprint_changes_with_the_libraries_that_compute_the_numbers(models, monkeypatch, library):
    """An upgrade that may change a model's numbers (kernels, attention, 4-bit dequantization) never reuses
    log-probs computed before it."""
    import importlib

    module = importlib.import_module(library)
    before = model_fingerprint(models[0])
    monkeypatch.setattr(module, "__version__", module.__version__ + ".post1")
    assert model_fingerprint(models[0]) != before


def test_fingerprint_changes_with_the_attention_implementation(tmp_path):
    path = make_model_dir(tmp_path / "m", seed=0)
    sdpa = load_base(str(path), load_in_4bit=False, attn_implementation="sdpa")
    eager = load_base(str(path), load_in_4bit=False, attn_implementation="eager")
    assert model_fingerprint(sdpa) != model_fingerprint(eager)
