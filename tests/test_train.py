"""End-to-end training on tiny local models with the real 4-bit path (CPU, bitsandbytes)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from accelerate import Accelerator
from peft import PeftModel
from tiny_models import learnable_rows, make_model_dir, write_jsonl

from kto_lite.batching import collate
from kto_lite.config import ConfigError, TrainConfig
from kto_lite.data import load_data, tokenize
from kto_lite.logps import completion_logps
from kto_lite.model import load_base, load_tokenizer, reference_mode
from kto_lite.run_dir import RunDir, prepare_output_dir, read_metrics, read_status
from kto_lite.train import Meter, Trainer, _StopFlag, resolve_defaults, train

CONTRACT_KEYS = {"step", "epoch", "loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
                 "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "tokens_per_second", "peak_memory_mb"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_model_dir(root / "model")
    write_jsonl(root / "train.jsonl", learnable_rows(96, seed=0))
    write_jsonl(root / "heldout.jsonl", learnable_rows(40, seed=1, held_out=True))
    return root


def config(workdir, name, **kw):
    values = dict(model=str(workdir / "model"), data=str(workdir / "train.jsonl"), output_dir=str(workdir / name),
                  lora_r=8, lora_alpha=16, learning_rate=2e-3, batch_size=4, gradient_accumulation_steps=2,
                  max_length=64, max_prompt_length=32, warmup_ratio=0.0, save_steps=0, seed=0)
    values.update(kw)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def trained(workdir):
    """One real training run shared by the tests below: 24 steps, eval on held-out prompts."""
    out = train(config(workdir, "run", max_steps=24, eval_data=str(workdir / "heldout.jsonl"), eval_steps=12),
                show_progress=False)
    return out


def heldout_logps(model_dir, adapter_dir, workdir):
    """Policy and reference log-probs of desirable and undesirable answers on held-out prompts."""
    tokenizer = load_tokenizer(str(model_dir))
    examples, _ = load_data(workdir / "heldout.jsonl")
    tok = tokenize(examples, tokenizer, max_length=64, max_prompt_length=32)
    model = PeftModel.from_pretrained(load_base(str(model_dir)), str(adapter_dir)).eval()
    b = collate([e.prompt_ids for e in tok], [e.completion_ids for e in tok], tokenizer.pad_token_id)
    with torch.no_grad():
        policy = completion_logps(model, **b)
    with reference_mode(model):
        reference = completion_logps(model, **b)
    fresh = load_base(str(model_dir)).eval()
    with torch.no_grad():
        base = completion_logps(fresh, **b)
    return policy, reference, base, torch.tensor([e.label for e in tok])


def test_run_writes_the_output_dir_contract(trained):
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "data_report.json",
                 "metrics.jsonl", "status.json", "tokenizer_config.json"):
        assert (trained / name).is_file(), name
    assert read_status(trained)["status"] == "finished"
    rows = read_metrics(trained)
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert all(CONTRACT_KEYS <= set(r) for r in rows)
    assert all(v == v for r in rows for v in r.values() if isinstance(v, float))  # no NaN
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [12, 24] and "eval_rewards/margins" in evals[0]
    assert TrainConfig.load(trained / "config.yaml").max_steps == 24


def test_first_step_policy_equals_reference(trained):
    first = read_metrics(trained)[0]
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4
    assert first["kl"] == 0.0


def test_training_learns_on_heldout_prompts_and_reference_is_untouched(trained, workdir):
    policy, reference, base, labels = heldout_logps(workdir / "model", trained, workdir)
    torch.testing.assert_close(reference, base, rtol=1e-5, atol=1e-5)  # adapters off == fresh base
    assert (policy - reference).abs().max() > 0.5  # while the policy moved
    rewards = policy - reference
    good, bad = rewards[labels], rewards[~labels]
    # every held-out desirable answer gains more than every undesirable one would by chance ~50%
    wins = (good[:, None] > bad[None, :]).float().mean().item()
    assert wins > 0.9, wins
    rows = read_metrics(trained)
    assert rows[-1]["rewards/margins"] > 0 and rows[-1]["eval_rewards/margins"] > 0


def test_gradients_reach_only_lora_and_the_base_never_changes(workdir):
    cfg = resolve_defaults(config(workdir, "grads", max_steps=2))
    prepare_output_dir(cfg)
    accelerator = Accelerator()
    trainer = Trainer(cfg, accelerator, RunDir(cfg.output_dir), _StopFlag(), show_progress=False)
    lora = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    out, *_ = trainer._forward(trainer.train_split, 0, trainer._epoch_plan(0)[0], grad=True)
    accelerator.backward(out.loss)
    # snapshot after the first forward: bitsandbytes repacks 4-bit weights for the CPU kernel on first use
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert lora and all("lora_" in n for n in lora) and all("lora_" not in n for n in frozen)
    assert {n for n, p in trainer.model.named_parameters() if p.grad is not None} == lora
    trainer.optimizer.zero_grad()
    for step in range(2):
        trainer.train_step(step, Meter(accelerator))
    for n, p in trainer.model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n


def test_auto_weights_follow_the_paper_rule(workdir):
    rows = learnable_rows(40, seed=4)
    rows = [r for i, r in enumerate(rows) if r["label"] or i % 4 == 1]  # 20 desirable : 10 undesirable
    write_jsonl(workdir / "imbalanced.jsonl", rows)
    cfg = resolve_defaults(config(workdir, "auto", data=str(workdir / "imbalanced.jsonl"),
                                  desirable_weight="auto", undesirable_weight="auto", max_steps=1))
    prepare_output_dir(cfg)
    Trainer(cfg, Accelerator(cpu=True), RunDir(cfg.output_dir), _StopFlag(), show_progress=False)
    ratio = cfg.desirable_weight * 20 / (cfg.undesirable_weight * 10)
    assert 1 <= ratio <= 4 / 3 + 1e-9 and max(cfg.desirable_weight, cfg.undesirable_weight) == 1.0
    saved = TrainConfig.load(workdir / "auto" / "config.yaml")
    assert saved.desirable_weight == cfg.desirable_weight != 1.0


def test_batch_size_one_and_one_sided_data(workdir):
    write_jsonl(workdir / "good_only.jsonl", learnable_rows(12, seed=3, desirable_only=True))
    out = train(config(workdir, "bs1", data=str(workdir / "good_only.jsonl"), batch_size=1,
                       gradient_accumulation_steps=2, max_steps=3), show_progress=False)
    rows = read_metrics(out)
    assert len(rows) == 3 and all(0 <= r["kl"] < float("inf") for r in rows)
    assert all("rewards/rejected" not in r and "rewards/margins" not in r for r in rows)  # missing side: no key
    report = json.loads((out / "data_report.json").read_text())
    assert report["n_undesirable"] == 0
    # z0 over the 4 micro-batches of a step instead of each single example
    out = train(config(workdir, "bs1_step", batch_size=1, gradient_accumulation_steps=4, max_steps=2,
                       kl_over_step=True), show_progress=False)
    assert all(0 <= r["kl"] < float("inf") for r in read_metrics(out))


def test_existing_run_is_not_overwritten(trained, workdir):
    with pytest.raises(ConfigError, match="already holds a finished run"):
        train(config(workdir, "run", max_steps=2), show_progress=False)
    assert read_status(trained)["status"] == "finished"


def test_stop_then_resume_matches_uninterrupted(workdir, monkeypatch):
    straight = train(config(workdir, "straight", max_steps=6, save_steps=3), show_progress=False)
    calls = {"n": 0}

    def stop_after_three(self):
        calls["n"] += 1
        return calls["n"] == 3

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_stop_requested", stop_after_three)
        stopped = train(config(workdir, "resumed", max_steps=6, save_steps=3), show_progress=False)
    assert read_status(stopped)["status"] == "stopped" and (stopped / "adapter_model.safetensors").is_file()
    assert [r["step"] for r in read_metrics(stopped)] == [1, 2, 3]
    train(config(workdir, "resumed", max_steps=6, save_steps=3, resume_from_checkpoint=True), show_progress=False)
    a, b = read_metrics(straight), read_metrics(stopped)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)
        assert x["rewards/margins"] == pytest.approx(y["rewards/margins"], rel=1e-3, abs=1e-5)
    assert read_status(stopped)["status"] == "finished"


def _cli(workdir, name, *extra):
    return [sys.executable, "-m", "kto_lite", "train", "--model", str(workdir / "model"),
            "--data", str(workdir / "train.jsonl"), "--output_dir", str(workdir / name), "--batch_size", "4",
            "--max_length", "64", "--max_prompt_length", "32", "--lora_r", "4", *extra]


def test_sigint_stops_gracefully(workdir):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(_cli(workdir, "sigint", "--max_steps", "500", "--gradient_accumulation_steps", "1"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and not read_metrics(workdir / "sigint"):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, output[-2000:]
    status = read_status(workdir / "sigint")
    assert status["status"] == "stopped" and 0 < status["step"] < 500
    assert (workdir / "sigint" / "adapter_model.safetensors").is_file()
    assert (workdir / "sigint" / "checkpoints" / f"checkpoint-{status['step']}").is_dir()


def test_two_process_cpu_run(workdir):
    """torchrun --nproc_per_node 2 (gloo): z0 and metrics are reduced across the processes."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           *_cli(workdir, "ddp", "--max_steps", "3", "--gradient_accumulation_steps", "2")[1:]]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert read_status(workdir / "ddp")["status"] == "finished"
    rows = read_metrics(workdir / "ddp")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["count/chosen"] + rows[0]["count/rejected"] == 2 * 2 * 4  # both processes counted
