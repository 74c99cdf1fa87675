"""End-to-end training on tiny local models with the real 4-bit path (CPU, bitsandbytes)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from peft import PeftModel
from tiny_models import learnable_rows, make_model_dir, make_recipe, stop_at_step, write_jsonl

from kto_lite.config import TrainConfig
from kto_lite.data import load_data, tokenize
from kto_lite.errors import ConfigError
from kto_lite.model import load_base, load_tokenizer, reference_mode
from kto_lite.runs import prepare_output_dir, read_metrics, read_status
from kto_lite.training.batching import Rows, collate
from kto_lite.training.logps import completion_logps
from kto_lite.training.loss import kto_loss
from kto_lite.training.metrics import Meter
from kto_lite.training.recipe import Recipe, train

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


def micro_batch_loss(recipe: Recipe, mb):
    """kto_loss of one micro-batch through the recipe's own pieces (what train_step does for each)."""
    policy_logps, policy_kl_logps = recipe.policy_logps(mb)
    reference_logps = recipe.reference_logps(mb)
    return kto_loss(policy_logps, reference_logps, mb.labels, z0=recipe.z0([mb], [policy_kl_logps]),
                    **recipe.loss_settings)


def heldout_logps(model_dir, adapter_dir, workdir):
    """Policy and reference log-probs of desirable and undesirable answers on held-out prompts."""
    tokenizer = load_tokenizer(str(model_dir))
    examples, _ = load_data(workdir / "heldout.jsonl")
    tok = tokenize(examples, tokenizer, max_length=64, max_prompt_length=32)
    model = PeftModel.from_pretrained(load_base(str(model_dir)), str(adapter_dir)).eval()
    b = collate([e.prompt_ids for e in tok], [e.completion_ids for e in tok], tokenizer.pad_token_id)
    with torch.no_grad():
        policy = completion_logps(model, b)
    with reference_mode(model):
        reference = completion_logps(model, b)
    fresh = load_base(str(model_dir)).eval()
    with torch.no_grad():
        base = completion_logps(fresh, b)
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
    assert 0.0 <= first["kl"] < 1e-5  # 0 up to float rounding (the reference pass may pack rows differently)


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
    trainer = make_recipe(config(workdir, "grads", max_steps=2))
    lora = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    out = micro_batch_loss(trainer, trainer.micro_batch(trainer.train_split, 0, trainer.steps[0][0][1]))
    trainer.accelerator.backward(out.loss)
    # snapshot after the first forward: bitsandbytes repacks 4-bit weights for the CPU kernel on first use
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert lora and all("lora_" in n for n in lora) and all("lora_" not in n for n in frozen)
    assert {n for n, p in trainer.model.named_parameters() if p.grad is not None} == lora
    trainer.optimizer.zero_grad()
    for step in trainer.steps:
        assert trainer.train_step([trainer.micro_batch(trainer.train_split, e, i) for e, i in step], Meter())
    for n, p in trainer.model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n


def test_default_weights_follow_the_paper_rule_and_a_set_weight_is_kept(workdir):
    rows = learnable_rows(40, seed=4)
    rows = [r for i, r in enumerate(rows) if r["label"] or i % 4 == 1]  # 20 desirable : 10 undesirable
    write_jsonl(workdir / "imbalanced.jsonl", rows)
    cfg = make_recipe(config(workdir, "auto", data=str(workdir / "imbalanced.jsonl"), max_steps=1)).config
    ratio = cfg.desirable_weight * 20 / (cfg.undesirable_weight * 10)
    assert 1 <= ratio <= 4 / 3 + 1e-9 and max(cfg.desirable_weight, cfg.undesirable_weight) == 1.0
    saved = TrainConfig.load(workdir / "auto" / "config.yaml")
    assert saved.desirable_weight == cfg.desirable_weight != 1.0  # the run records the numbers it used
    cfg = make_recipe(config(workdir, "set", data=str(workdir / "imbalanced.jsonl"), max_steps=1,
                             desirable_weight=1.0)).config
    assert (cfg.desirable_weight, cfg.undesirable_weight) == pytest.approx((1.0, 1.5))  # the 'auto' one completes the set one


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
    with monkeypatch.context() as m:
        m.setattr(Recipe, "_stop_requested", stop_at_step(3))
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


def test_resume_from_another_runs_checkpoint_into_a_new_output_dir(workdir):
    """An explicit checkpoint folder of another run starts a new output_dir (created) and never writes over a run
    that is there; one of output_dir's own checkpoints continues that run."""
    ckpt = workdir / "ckpt_source" / "checkpoints" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2}))
    fresh = config(workdir, "ckpt_new", resume_from_checkpoint=str(ckpt)).resolved()
    assert prepare_output_dir(fresh) == ckpt and (workdir / "ckpt_new").is_dir()
    (workdir / "ckpt_taken").mkdir()
    (workdir / "ckpt_taken" / "status.json").write_text(json.dumps({"status": "finished", "pid": 1}))
    (workdir / "ckpt_taken" / "adapter_model.safetensors").write_text("an earlier run")
    with pytest.raises(ConfigError, match="already holds a finished run"):
        prepare_output_dir(config(workdir, "ckpt_taken", resume_from_checkpoint=str(ckpt)).resolved())
    assert (workdir / "ckpt_taken" / "adapter_model.safetensors").read_text() == "an earlier run"
    (workdir / "ckpt_source" / "status.json").write_text(json.dumps({"status": "stopped", "pid": 1}))
    own = config(workdir, "ckpt_source", resume_from_checkpoint=str(ckpt)).resolved()
    assert prepare_output_dir(own) == ckpt
    with pytest.raises(ConfigError, match="not a kto_lite checkpoint"):
        prepare_output_dir(config(workdir, "ckpt_none", resume_from_checkpoint=str(workdir / "model")).resolved())


def _cli(workdir, name, *extra):
    return [sys.executable, "-m", "kto_lite", "train", "--model", str(workdir / "model"),
            "--data", str(workdir / "train.jsonl"), "--output_dir", str(workdir / name), "--batch_size", "4",
            "--max_length", "64", "--max_prompt_length", "32", "--lora_r", "4", *extra]


@pytest.mark.slow
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


@pytest.mark.multiprocess
def test_two_process_cpu_run(workdir):
    """torchrun --nproc_per_node 2 (gloo): z0 and metrics are reduced across the processes; only the
    main process decides what happens to an existing output_dir."""
    from kto_lite.training.batching import epoch_batches

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    (workdir / "ddp").mkdir()
    (workdir / "ddp" / "status.json").write_text(json.dumps({"status": "finished", "pid": 1}))
    (workdir / "ddp" / "adapter_model.safetensors").write_text("an earlier run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           *_cli(workdir, "ddp", "--max_steps", "3", "--gradient_accumulation_steps", "2",
                 "--overwrite_output_dir", "true")[1:]]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    status = read_status(workdir / "ddp")
    assert status["status"] == "finished"
    assert len(list(workdir.glob("ddp.old-*"))) == 1  # moved aside once, by the main process
    rows = read_metrics(workdir / "ddp")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["count/chosen"] + rows[0]["count/rejected"] == 2 * 2 * 4  # both processes counted
    # tokens (and tokens_per_second) count both processes' examples: recompute the plan here
    tokenizer = load_tokenizer(str(workdir / "model"))
    examples = tokenize(load_data(workdir / "train.jsonl")[0], tokenizer, max_length=64, max_prompt_length=32)
    lengths = [len(e.prompt_ids) + len(e.completion_ids) for e in examples]
    batches = epoch_batches(lengths, [e.label for e in examples], 4, seed=42, epoch=0)
    per_process = len(batches) // 2
    expected = sum(lengths[i] for rank in (0, 1) for b in batches[rank::2][:per_process][:6] for i in b)
    assert status["timing"]["tokens"] == expected


@pytest.mark.multiprocess
def test_fsdp_trains_what_ddp_trains(workdir):
    """fsdp: true under torchrun (2 CPU processes, gloo): the 4-bit base, LoRA weights, gradients and optimizer
    state sharded with fully_shard; the same losses, margins and adapter as the same launch with DDP. Its
    checkpoints hold the whole adapter and optimizer state: resumed from step 2, step 3 is the same again."""
    from safetensors.torch import load_file

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    runs = {}
    launches = (("ddp2", "29533", ()), ("fsdp2", "29534", ("--fsdp", "true")),
                ("fsdp2_resumed", "29535", ("--fsdp", "true", "--resume_from_checkpoint",
                                            str(workdir / "fsdp2" / "checkpoints" / "checkpoint-2"))))
    for name, port, extra in launches:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               *_cli(workdir, name, "--max_steps", "3", "--gradient_accumulation_steps", "2", "--lora_dropout", "0",
                     "--eval_data", str(workdir / "heldout.jsonl"), "--eval_steps", "3", "--save_steps", "2",
                     *extra)[1:]]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        runs[name] = read_metrics(workdir / name)
    assert [r["step"] for r in runs["fsdp2"]] == [1, 2, 3]
    assert [r["step"] for r in runs["fsdp2_resumed"]] == [3]
    for other in ("ddp2", "fsdp2_resumed"):
        for sharded, replicated in zip(runs["fsdp2"][::-1], runs[other][::-1]):  # from the last step back
            for key in ("loss", "kl", "rewards/margins", "grad_norm", "count/chosen"):
                assert sharded[key] == pytest.approx(replicated[key], rel=1e-3, abs=1e-5), (other, key)
        assert runs["fsdp2"][-1]["eval_loss"] == pytest.approx(runs[other][-1]["eval_loss"], rel=1e-3)
        adapters = [load_file(workdir / name / "adapter_model.safetensors") for name in ("fsdp2", other)]
        assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) > 0
        for key, value in adapters[0].items():
            torch.testing.assert_close(value, adapters[1][key], rtol=1e-3, atol=1e-5)
    checkpoint = load_file(workdir / "fsdp2" / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    assert checkpoint.keys() == adapters[0].keys()  # a whole adapter, like any run's (not one process's shards)
    assert not any(torch.equal(checkpoint[k], adapters[0][k]) for k in checkpoint if "lora_B" in k)  # step 2's
    status = read_status(workdir / "fsdp2")
    assert status["status"] == "finished"
    assert 0.45 < status["timing"]["fsdp_weights_per_process"] < 0.55  # each process holds half the weights


# ---------------------------------------------------------------------- epochs, schedules, splits, resuming
def count_reference_passes(monkeypatch):
    """Patch the reference pass to count its calls (examples and KL rows, per split and epoch)."""
    import kto_lite.training.recipe as train_module

    calls = []
    real = train_module.cached_reference_logps

    def counting(model, sequences, **kw):
        calls.append(kw["desc"] if not kw.get("shared") else f"{kw['desc']} x{len(sequences[0][1])}")
        return real(model, sequences, **kw)

    monkeypatch.setattr(train_module, "cached_reference_logps", counting)
    return calls


def test_one_epoch_never_draws_a_second_epoch(workdir, monkeypatch):
    """96 examples / batch 4 = 24 micro-batches; accumulation 5 does not divide it. The old plan,
    ceil(epochs * batches / gas) = 5 steps of 5, drew one micro-batch of epoch 2 and a whole second KL
    reference pass."""
    calls = count_reference_passes(monkeypatch)
    out = train(config(workdir, "one_epoch", num_epochs=1, gradient_accumulation_steps=5, share_prompts=False),
                show_progress=False)
    assert calls == ["reference log-probs", "reference KL log-probs, epoch 1"]
    rows = read_metrics(out)
    assert len(rows) == 5 and rows[-1]["epoch"] == 1.0
    assert sum(r["count/chosen"] + r["count/rejected"] for r in rows) == 96  # each example once


def test_apo_zero_unpaired_computes_no_kl_rows(workdir, monkeypatch):
    calls = count_reference_passes(monkeypatch)
    out = train(config(workdir, "apo", loss_type="apo_zero_unpaired", max_steps=2), show_progress=False)
    assert calls == ["reference log-probs"]
    assert all(r["kl"] == 0.0 for r in read_metrics(out))


def test_eval_fraction_holds_out_whole_prompts(workdir):
    """Paired data: the chosen and the rejected answer of one prompt must land on the same side."""
    pairs = [{"prompt": f"what is the {c} {t} ?", "chosen": "yes good answer .", "rejected": f"no bad answer . {c}"}
             for c in ("red", "blue", "green", "big", "small") for t in ("cat", "dog", "bird", "fish")]
    write_jsonl(workdir / "pairs.jsonl", pairs)
    recipe = make_recipe(config(workdir, "fraction", data=str(workdir / "pairs.jsonl"), eval_fraction=0.25,
                                max_steps=1))
    def prompts(split):
        return {tuple(e.prompt_ids) for e in split.examples}

    assert prompts(recipe.train_split).isdisjoint(prompts(recipe.eval_split))
    assert len(recipe.eval_split.examples) == 2 * 5  # 5 of the 20 prompts, both answers each


def test_a_run_that_failed_early_is_simply_replaced(workdir):
    (workdir / "broken.jsonl").write_text('{"prompt": "a", "completion": "b", "label": "maybe"}\n')
    with pytest.raises(Exception, match="unknown label"):
        train(config(workdir, "early_fail", data=str(workdir / "broken.jsonl"), max_steps=1), show_progress=False)
    assert read_status(workdir / "early_fail")["status"] == "failed"
    out = train(config(workdir, "early_fail", max_steps=1), show_progress=False)  # no "already holds a failed run"
    assert read_status(out)["status"] == "finished"
    assert not list(workdir.glob("early_fail.old-*"))


def test_constant_schedule_honours_warmup(workdir):
    recipe = make_recipe(config(workdir, "constant_warmup", lr_scheduler_type="constant", warmup_ratio=0.5,
                                max_steps=4, learning_rate=1e-3))
    assert recipe.scheduler.get_last_lr()[0] == 0.0  # warming up from 0, not constant from step 1
    recipe = make_recipe(config(workdir, "constant", lr_scheduler_type="constant", warmup_ratio=None,
                                max_steps=4, learning_rate=1e-3))
    assert recipe.config.warmup_ratio == 0.0 and recipe.scheduler.get_last_lr()[0] == 1e-3


def test_resume_refuses_a_different_config(workdir, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(Recipe, "_stop_requested", lambda self: True)
        train(config(workdir, "resume_check", max_steps=4), show_progress=False)
    with pytest.raises(ConfigError, match=r"beta \(checkpoint: 0.1, now: 0.3\)"):
        train(config(workdir, "resume_check", max_steps=4, beta=0.3, resume_from_checkpoint=True),
              show_progress=False)
    state_file = workdir / "resume_check" / "checkpoints" / "checkpoint-1" / "trainer_state.json"
    saved = json.loads(state_file.read_text())
    assert saved == {"step": 1, "processes": 1}
    state_file.write_text(json.dumps({**saved, "processes": 2}))  # as a two-process launch writes it
    with pytest.raises(ConfigError, match="launch of 2 process.*torchrun --nproc_per_node 2"):
        train(config(workdir, "resume_check", max_steps=4, resume_from_checkpoint=True), show_progress=False)
    state_file.write_text(json.dumps(saved))
    train(config(workdir, "resume_check", max_steps=4, logging_steps=2, resume_from_checkpoint=True),
          show_progress=False)  # logging is not part of the computation: allowed
    assert read_status(workdir / "resume_check")["status"] == "finished"


def test_max_length_alone_trains(workdir):
    out = train(config(workdir, "max_length_only", max_length=48, max_prompt_length=None, max_steps=1),
                show_progress=False)
    saved = TrainConfig.load(out / "config.yaml")
    assert (saved.max_length, saved.max_prompt_length) == (48, 24)


# ---------------------------------------------------------------------- the NaN guard
def test_non_finite_steps_are_skipped_then_stop_the_run(workdir, monkeypatch):
    import kto_lite.training.recipe as train_module

    real = train_module.kto_loss
    bad_steps = {2}
    state = {"calls": 0, "step": 0}

    def poisoned(*args, **kw):
        out = real(*args, **kw)
        return out._replace(loss=out.loss * float("nan")) if state["step"] in bad_steps else out

    real_step = Recipe.train_step

    def counting_step(self, micro_batches, meter):
        state["step"] += 1
        return real_step(self, micro_batches, meter)

    monkeypatch.setattr(train_module, "kto_loss", poisoned)
    monkeypatch.setattr(Recipe, "train_step", counting_step)
    out = train(config(workdir, "one_nan", max_steps=4), show_progress=False)
    rows = read_metrics(out)
    assert read_status(out)["status"] == "finished" and rows[1].get("skipped_steps") == 1
    assert "grad_norm" not in rows[1] and all(v == v for r in rows for v in r.values() if isinstance(v, float))
    assert rows[1]["learning_rate"] == rows[0]["learning_rate"]  # the schedule did not advance either

    state["step"] = 0
    bad_steps.update(range(1, 100))
    with pytest.raises(FloatingPointError, match="not finite for 5 steps in a row"):
        train(config(workdir, "all_nan", max_steps=20), show_progress=False)
    status = read_status(workdir / "all_nan")
    assert status["status"] == "failed" and "Lower learning_rate" in status["message"]


# ---------------------------------------------------------------------- rounds (init_adapter, reference)
def direct_logps(workdir, adapter_dir, rows: Rows):
    """log-probs of `rows` under a freshly loaded base, and under base + the adapter at `adapter_dir`."""
    base = load_base(str(workdir / "model"))
    base.eval()
    with torch.no_grad():
        plain = completion_logps(base, rows)
        tuned = completion_logps(PeftModel.from_pretrained(base, str(adapter_dir)).eval(), rows)
    return plain, tuned


@pytest.mark.parametrize("reference", ["base", "init_adapter"])
def test_init_adapter_continues_from_the_previous_round(trained, workdir, reference):
    recipe = make_recipe(config(workdir, f"round2-{reference}", init_adapter=str(trained), reference=reference,
                                max_steps=3, lora_r=16, lora_alpha=None))
    assert recipe.config.lora_r == 8 and recipe.config.lora_alpha == 16  # the adapter's own shape, not the flags
    recipe.compute_reference_columns(recipe.train_split)
    mb = recipe.micro_batch(recipe.train_split, 0, recipe.steps[0][0][1])
    n = len(mb)  # the examples' log-probs come first (shared-prompt rows also hold the KL rows')
    plain, previous = (logps[:n] for logps in direct_logps(workdir, trained, mb.rows))
    recipe.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(completion_logps(recipe.model, mb.rows)[:n], previous, rtol=1e-4, atol=1e-4)
    # the reference column is the base (adapters off) or the frozen previous adapter
    torch.testing.assert_close(mb.reference_logps, plain if reference == "base" else previous, rtol=1e-4, atol=1e-4)
    out = micro_batch_loss(recipe, mb)
    beta = recipe.config.beta
    torch.testing.assert_close(out.rewards, beta * (previous - (plain if reference == "base" else previous)),
                               rtol=1e-3, atol=1e-4)
    # training moves the policy; the reference stays what it was (computed on the fly here)
    for step in recipe.steps:
        recipe.train_step([recipe.micro_batch(recipe.train_split, e, i) for e, i in step], Meter())
    with reference_mode(recipe.model):
        still = completion_logps(recipe.model, mb.rows)[:n]
    torch.testing.assert_close(still, plain if reference == "base" else previous, rtol=1e-4, atol=1e-4)
    recipe.model.eval()
    with torch.no_grad():
        assert (completion_logps(recipe.model, mb.rows)[:n] - previous).abs().max() > 1e-3
    assert {n for n, p in recipe.model.named_parameters() if p.requires_grad} == {
        n for n, _ in recipe.model.named_parameters() if "lora_" in n and ".default." in n}


def test_init_adapter_shape_conflicts_are_refused(trained, workdir):
    with pytest.raises(ConfigError, match="lora_r: 32 differs from init_adapter's 8"):
        config(workdir, "conflict", init_adapter=str(trained), lora_r=32).resolved()
    with pytest.raises(ConfigError, match="holds no adapter"):
        config(workdir, "conflict", init_adapter=str(workdir)).resolved()


def test_fixed_kl_pairing_pays_the_kl_reference_pass_once(workdir, monkeypatch):
    calls = count_reference_passes(monkeypatch)
    recipe = make_recipe(config(workdir, "fixed_pairs", num_epochs=2, kl_pairing="fixed", share_prompts=False))
    assert recipe.train_split.kl_partners[0] == recipe.train_split.kl_partners[1]
    recipe.compute_reference_columns(recipe.train_split)
    assert calls == ["reference log-probs", "reference KL log-probs, epoch 1"]
    assert torch.equal(recipe.train_split.reference_kl_logps[1], recipe.train_split.reference_kl_logps[0])
    per_epoch = make_recipe(config(workdir, "per_epoch_pairs", num_epochs=2))
    assert per_epoch.train_split.kl_partners[0] != per_epoch.train_split.kl_partners[1]
    calls.clear()
    per_epoch.compute_reference_columns(per_epoch.train_split)  # shared prompts: one pass, 1 + 2 completions each
    assert calls == ["reference log-probs (examples and KL rows) x3"]
    recipe.layout = dataclasses.replace(recipe.layout, shared_reference=True)
    calls.clear()
    recipe.compute_reference_columns(recipe.train_split)  # fixed pairing, shared: one KL completion per prompt
    assert calls == ["reference log-probs (examples and KL rows) x2"]


def test_the_command_line_prints_nothing_a_user_cannot_act_on(workdir):
    """No bitsandbytes "install kernels" advice, no transformers FutureWarnings; the summary."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(_cli(workdir, "quiet", "--max_steps", "1"), env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    noise = ("kernels-community", "FutureWarning", "is deprecated")
    assert not [n for n in noise if n in result.stdout + result.stderr], result.stderr[-2000:]
    assert f"chat with it   python -m kto_lite chat --adapter {workdir / 'quiet'}" in result.stdout


# ---------------------------------------------------------------------- shared prompts
def test_shared_prompts_train_the_same_numbers(workdir, monkeypatch):
    """An example and its KL row scored after one copy of their prompt (one forward for the loss and z0, one
    reference pass for the examples and every epoch's KL rows) train what separate rows train."""
    calls = count_reference_passes(monkeypatch)
    runs = {}
    for share in (True, False):
        cfg = config(workdir, f"share_{share}", num_epochs=2, lora_dropout=0.0, share_prompts=share,
                     eval_data=str(workdir / "heldout.jsonl"), eval_steps=6)
        runs[share] = read_metrics(train(cfg, show_progress=False))
    assert calls == ["reference log-probs (examples and KL rows) x3", "reference log-probs (examples and KL rows) x2",
                     "reference log-probs", "reference KL log-probs, epoch 1", "reference KL log-probs, epoch 2",
                     "reference log-probs", "reference KL log-probs, epoch 1"]  # train split, then eval split
    assert len(runs[True]) == len(runs[False]) == 24
    for shared, separate in zip(runs[True], runs[False]):
        for key in ("loss", "kl", "rewards/margins", "logps/chosen", "grad_norm", "eval_loss", "eval_kl"):
            if key in separate:
                assert shared[key] == pytest.approx(separate[key], rel=1e-3, abs=1e-4), key
    assert runs[True][-1]["rewards/margins"] > 0  # it learned something, the same way


def test_share_prompts_is_refused_where_it_cannot_work(workdir):
    with pytest.raises(ConfigError, match="kl_over_step"):
        make_recipe(config(workdir, "share_kl_over_step", share_prompts=True, kl_over_step=True))
    with pytest.raises(ConfigError, match="multi-process launch"):
        train(config(workdir, "fsdp_alone", fsdp=True), show_progress=False)
    with pytest.raises(ConfigError, match="padding-free"):
        make_recipe(config(workdir, "share_padded", share_prompts=True, padding_free=False))
    auto = make_recipe(config(workdir, "share_auto_step", kl_over_step=True))
    assert (auto.layout.shared_reference, auto.layout.shared_training) == (True, False)  # the reference pass still shares


def test_reference_on_the_fly_runs_once_per_micro_batch_on_shared_rows(workdir, monkeypatch):
    """precompute_reference: false: shared rows give the examples' and the KL rows' reference log-probs in one
    adapters-off pass per micro-batch; separate rows need two (examples, KL rows)."""
    import kto_lite.training.recipe as train_module

    passes = []
    real = train_module.reference_mode

    def counting(model):
        passes.append(1)
        return real(model)

    monkeypatch.setattr(train_module, "reference_mode", counting)
    for share, per_micro_batch in ((True, 1), (False, 2)):
        recipe = make_recipe(config(workdir, f"on_the_fly_{share}", precompute_reference=False, share_prompts=share,
                                    max_steps=2))
        passes.clear()
        for step in recipe.steps:
            assert recipe.train_step([recipe.micro_batch(recipe.train_split, e, i) for e, i in step], Meter())
        assert len(passes) == per_micro_batch * sum(len(step) for step in recipe.steps), share


# ---------------------------------------------------------------------- precision a model cannot train in
@pytest.mark.parametrize("gpu", ["T4", "V100"])
def test_a_model_that_overflows_fp16_is_refused_before_training_on_fp16_gpus(workdir, monkeypatch, gpu):
    """Gemma-2's activations exceed fp16's range: on a GPU without bf16 the run would stop after 20 skipped steps.
    It is refused before anything loads, with what to do instead; a model that trains in fp16 is not."""
    from test_model_loading import simulate
    from tiny_models import make_arch_model_dir

    import kto_lite.training.recipe as train_module

    gemma = make_arch_model_dir(workdir / f"gemma2_{gpu}", "gemma2")
    simulate(monkeypatch, gpu)
    monkeypatch.setattr(train_module, "Accelerator", None)  # nothing may start: the check comes first
    with pytest.raises(ConfigError, match=r"Gemma-2.*fp16.*mixed_precision: no.*another model"):
        train(config(workdir, f"gemma_fp16_{gpu}", model=str(gemma), max_steps=1), show_progress=False)
    assert not (workdir / f"gemma_fp16_{gpu}").exists()
    from kto_lite.model import check_precision

    check_precision(str(workdir / "model"), "fp16")  # Llama: trains in fp16 with loss scaling
    check_precision(str(gemma), "no")  # fp32: no overflow
    check_precision(str(gemma), "bf16")


def test_setup_falls_back_to_padded_rows_when_attention_gets_no_position_ids(workdir, monkeypatch):
    """A model whose attention is not given the position ids: the layout probe says no, the run trains on padded
    rows, and status.json says so."""
    from test_logps import drop_position_ids

    drop_position_ids(monkeypatch)
    out = train(config(workdir, "no_position_ids", max_steps=1), show_progress=False)
    layout = read_status(out)["layout"]
    assert layout["packed"] is False and layout["shared_reference"] is False
    assert layout["why"].startswith("padded rows (packed rows would change this model's numbers")
    assert read_status(out)["status"] == "finished"


# ---------------------------------------------------------------------- evaluation never costs the run
def test_eval_plan_deals_every_held_out_example_once_over_the_processes(workdir):
    """3 held-out batches over 2 processes: process 0 gets two, process 1 one and a stand-in (None) for the
    second round; one batch over 2 processes: one each, a stand-in on process 1. No batch is dropped."""
    recipe = make_recipe(config(workdir, "eval_plan", max_steps=1, eval_data=str(workdir / "heldout.jsonl")))
    for n_examples, world in ((40, 3), (12, 2), (3, 2)):
        recipe.eval_split.examples = recipe.eval_split.examples[:n_examples]
        plans = []
        for rank in range(world):
            recipe.accelerator = type("Launch", (), {"num_processes": world, "process_index": rank})()
            plans.append(recipe.eval_plan())
        assert len({len(plan) for plan in plans}) == 1  # the same number of rounds on every process
        dealt = sorted(i for plan in plans for batch in plan if batch is not None for i in batch)
        assert dealt == list(range(n_examples)), (n_examples, world)


def test_a_failing_last_evaluation_leaves_a_resumable_run(workdir, monkeypatch, capsys):
    """The last step's checkpoint is written before its evaluation runs: an evaluation that fails loses nothing,
    and resuming finishes the run from that step."""
    def broken(self):
        raise RuntimeError("evaluation failed")

    with monkeypatch.context() as m:
        m.setattr(Recipe, "evaluate", broken)
        with pytest.raises(RuntimeError, match="evaluation failed"):
            train(config(workdir, "eval_fails", max_steps=3, eval_data=str(workdir / "heldout.jsonl")),
                  show_progress=False)
    assert read_status(workdir / "eval_fails")["status"] == "failed"
    train(config(workdir, "eval_fails", max_steps=3, eval_data=str(workdir / "heldout.jsonl"),
                 resume_from_checkpoint=True), show_progress=False)
    assert "at step 3" in capsys.readouterr().out
    assert read_status(workdir / "eval_fails")["status"] == "finished"
    assert (workdir / "eval_fails" / "adapter_model.safetensors").is_file()
