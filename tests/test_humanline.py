"""Humanline KTO (kto_lite/training/humanline.py, loss.humanline_log_ratios): numbers worked by hand, then the
recipe's micro-batch loss against a direct computation, the reference sync, and resuming.
"""

import math

import pytest
import torch
from tiny_models import make_recipe, stop_at_step

from kto_lite.config import TrainConfig
from kto_lite.demo import DEMO_MODEL_DIR, DEMO_SAMPLES
from kto_lite.errors import ConfigError
from kto_lite.model import reference_mode
from kto_lite.runs import read_metrics, read_status
from kto_lite.training.batching import collate
from kto_lite.training.logps import completion_token_logps
from kto_lite.training.loss import humanline_log_ratios, kto_loss
from kto_lite.training.metrics import Meter
from kto_lite.training.recipe import Recipe, train

# --------------------------------------------------------------------------- the clamped log-ratio, by hand
# Two completions: tokens 0-2 belong to sequence 0, tokens 3-4 to sequence 1. With log eps_P = -1, log eps_R = 1.5:
#   log pi - log pi_ref = [0.2, 2.0, -1.5 | 0.0, -2.0]  ->  clamped [0.2, 1.5, -1.0 | 0.0, -1.0]
#   r = [0.2 + 1.5 - 1.0, 0.0 - 1.0] = [0.7, -1.0]; unclamped KTO would use [0.7, -2.0]
POLICY = [-1.0, -0.5, -2.0, -0.2, -3.0]
REFERENCE = [-1.2, -2.5, -0.5, -0.2, -1.0]
SEQUENCE = [0, 0, 0, 1, 1]
BOUNDS = dict(log_epsilon_P=-1.0, log_epsilon_R=1.5)


def test_log_ratios_are_clamped_per_token_then_summed():
    policy = torch.tensor(POLICY, requires_grad=True)
    reference = torch.tensor(REFERENCE, requires_grad=True)
    r = humanline_log_ratios(policy, reference, torch.tensor(SEQUENCE), 2, **BOUNDS)
    torch.testing.assert_close(r, torch.tensor([0.7, -1.0]))
    r.sum().backward()
    # a clamped token gets no gradient; the reference never does
    assert policy.grad.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert reference.grad is None


def test_wide_bounds_give_kto_s_log_ratio():
    r = humanline_log_ratios(torch.tensor(POLICY), torch.tensor(REFERENCE), torch.tensor(SEQUENCE), 2,
                             log_epsilon_P=-100.0, log_epsilon_R=100.0)
    torch.testing.assert_close(r, torch.tensor([0.2 + 2.0 - 1.5, 0.0 - 2.0]))


def test_kto_loss_on_humanline_ratios_by_hand():
    """KTO eq. 7 with r = [0.7, -1.0], z0 = 0.05 (the KL rows' clamped ratios), beta 0.1, lambda 1:
    desirable 1 - sigmoid(0.1 (0.7 - 0.05)), undesirable 1 - sigmoid(0.1 (0.05 + 1.0))."""
    r = humanline_log_ratios(torch.tensor(POLICY), torch.tensor(REFERENCE), torch.tensor(SEQUENCE), 2, **BOUNDS)
    out = kto_loss(r, torch.zeros(2), torch.tensor([True, False]), z0=torch.tensor(0.05), beta=0.1)

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    expected = [1 - sigmoid(0.1 * 0.65), 1 - sigmoid(0.1 * 1.05)]
    torch.testing.assert_close(out.losses, torch.tensor(expected))
    torch.testing.assert_close(out.rewards, torch.tensor([0.07, -0.1]))


# --------------------------------------------------------------------------- in the recipe


def config(tmp_path, name="run", **kw) -> TrainConfig:
    values = dict(model=str(DEMO_MODEL_DIR), data=str(DEMO_SAMPLES["kto"]), output_dir=str(tmp_path / name),
                  load_in_4bit=False, batch_size=8, gradient_accumulation_steps=1, max_length=64,
                  max_prompt_length=32, lora_dropout=0.0, seed=0, save_steps=0, learning_rate=3e-3, warmup_ratio=0.0,
                  humanline=True, log_epsilon_P=-0.05, log_epsilon_R=0.05, humanline_sync_steps=3)
    return TrainConfig(**{**values, **kw})


def direct_loss(recipe: Recipe, split, indices: list[int]) -> torch.Tensor:
    """Humanline KTO of these examples computed one row at a time, padded, with the model's own passes."""
    ex, cfg, model = split.examples, recipe.config, recipe.model
    partners = split.kl_partners[0]

    def ratio(prompt, completion):
        rows = collate([prompt], [completion], recipe.pad_id, cfg.max_length)
        with torch.no_grad():
            policy, sequence = completion_token_logps(model, rows)
            with reference_mode(model):
                reference, _ = completion_token_logps(model, rows)
        return humanline_log_ratios(policy, reference, sequence, 1, log_epsilon_P=cfg.log_epsilon_P,
                                    log_epsilon_R=cfg.log_epsilon_R)[0]

    r = torch.stack([ratio(ex[i].prompt_ids, ex[i].completion_ids) for i in indices])
    r_kl = torch.stack([ratio(ex[i].prompt_ids, ex[partners[i]].completion_ids) for i in indices])
    labels = torch.tensor([ex[i].label for i in indices])
    return kto_loss(r, torch.zeros_like(r), labels, z0=r_kl.mean().clamp(min=0), **recipe.loss_settings).loss


@pytest.mark.slow
@pytest.mark.parametrize("share_prompts", [False, True])
def test_the_micro_batch_loss_is_the_direct_computation(tmp_path, share_prompts):
    """After a few steps (policy != reference, tokens clamped), the recipe's humanline loss of a micro-batch, in
    its packed or shared-prompt rows, equals the loss computed row by row."""
    recipe = make_recipe(config(tmp_path, share_prompts=share_prompts))
    assert recipe.layout.shared_training == share_prompts
    for step in (1, 2):  # move the policy away from the reference (synced every 3 steps)
        recipe.train_step([recipe.micro_batch(recipe.train_split, e, b) for e, b in recipe.steps[step - 1]],
                          Meter())
        recipe.humanline.step_done(step)
    recipe.model.eval()  # dropout is 0; eval mode only makes the comparison independent of it
    indices = recipe.steps[2][0][1]
    mb = recipe.micro_batch(recipe.train_split, 0, indices)
    with torch.no_grad():
        out, _ = recipe.humanline.loss(recipe, mb)
    torch.testing.assert_close(out.loss, direct_loss(recipe, recipe.train_split, indices), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_the_reference_follows_the_policy_every_sync_steps(tmp_path):
    recipe = make_recipe(config(tmp_path))
    pairs = recipe.humanline.pairs
    assert pairs and all(torch.equal(a, b) for a, b in pairs)  # the reference starts as the policy
    assert not any(b.requires_grad for _, b in pairs) and all(a.requires_grad for a, _ in pairs)
    for step in (1, 2, 3):
        recipe.train_step([recipe.micro_batch(recipe.train_split, e, b) for e, b in recipe.steps[step - 1]], Meter())
        recipe.humanline.step_done(step)
        synced = all(torch.equal(a, b) for a, b in pairs)
        assert synced == (step == 3), step  # moved apart, then synced at step 3


@pytest.mark.slow
def test_a_humanline_run_resumes_as_it_would_have_gone_on(tmp_path, monkeypatch):
    """Stopped at step 3 (a sync step, a checkpoint), resumed: the same losses as the uninterrupted run; its first
    step equals plain KTO's (policy == reference: every log-ratio is 0)."""
    straight = train(config(tmp_path, "straight", max_steps=6, save_steps=3), show_progress=False)
    with monkeypatch.context() as m:
        m.setattr(Recipe, "_stop_requested", stop_at_step(3))
        stopped = train(config(tmp_path, "resumed", max_steps=6, save_steps=3), show_progress=False)
    assert read_status(stopped)["status"] == "stopped"
    train(config(tmp_path, "resumed", max_steps=6, save_steps=3, resume_from_checkpoint=True), show_progress=False)
    a, b = read_metrics(straight), read_metrics(stopped)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-7)
    plain = train(config(tmp_path, "plain", max_steps=1, humanline=False), show_progress=False)
    assert read_metrics(plain)[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-6)


@pytest.mark.slow
def test_synced_every_step_every_log_ratio_is_zero(tmp_path):
    """humanline_sync_steps 1: each step starts with reference == policy, so every token's log-ratio in its forward
    is 0 (no dropout here), rewards and z0 are 0 and no token is clamped: the gradient is KTO's at r = 0, a fixed
    weight on log pi (docs/methods.md)."""
    run = train(config(tmp_path, max_steps=4, humanline_sync_steps=1), show_progress=False)
    for row in read_metrics(run):
        assert row["kl"] == 0
        assert abs(row["rewards/chosen"]) < 1e-6 and abs(row["rewards/rejected"]) < 1e-6, row
    assert read_metrics(run)[-1]["logps/chosen"] != read_metrics(run)[0]["logps/chosen"]  # and yet it learns


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"log_epsilon_P": 0.5}, "log_epsilon_P < 0 < log_epsilon_R"),
        ({"log_epsilon_R": -0.1}, "log_epsilon_P < 0 < log_epsilon_R"),
        ({"humanline_sync_steps": 0}, "humanline_sync_steps must be > 0"),
        ({"loss_type": "apo_zero_unpaired"}, "loss_type kto"),
        ({"kl_over_step": True}, "kl_over_step"),
        ({"humanline_sync_steps": 3, "save_steps": 10}, "multiple of humanline_sync_steps"),
    ],
)
def test_humanline_settings_are_checked_on_load(fields, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(humanline=True, **fields)
