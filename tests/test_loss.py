"""kto_loss against the paper's formula, computed independently element by element in plain Python."""

import math

import pytest
import torch

from kto_lite.training.loss import kto_loss, z0_estimate


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def formula(pol, ref, pol_kl, ref_kl, labels, beta, wd, wu, loss_type):
    """docs/design.md, "The loss" / paper eq. 7, one example at a time."""
    z0 = max(0.0, sum(p - r for p, r in zip(pol_kl, ref_kl)) / len(pol_kl))
    losses = []
    for p, r, good in zip(pol, ref, labels):
        ratio = p - r
        if loss_type == "kto":
            losses.append(wd * (1 - sigmoid(beta * (ratio - z0))) if good else wu * (1 - sigmoid(beta * (z0 - ratio))))
        else:  # apo_zero_unpaired: no reference point
            losses.append(wd * (1 - sigmoid(beta * ratio)) if good else wu * sigmoid(beta * ratio))
    return sum(losses) / len(losses), losses, [beta * (p - r) for p, r in zip(pol, ref)], z0


CASES = [  # (beta, desirable_weight, undesirable_weight, loss_type, label pattern, kl shift)
    (0.1, 1.0, 1.0, "kto", "mixed", +3.0),
    (0.5, 1.33, 1.0, "kto", "mixed", +0.5),
    (0.05, 1.0, 2.5, "kto", "mixed", -4.0),  # z0 below zero: clamped to 0
    (0.1, 1.0, 1.0, "kto", "all_desirable", +1.0),
    (0.1, 1.0, 1.0, "kto", "all_undesirable", +1.0),
    (0.2, 1.5, 0.7, "apo_zero_unpaired", "mixed", +2.0),
    (0.2, 1.0, 1.0, "apo_zero_unpaired", "all_undesirable", +2.0),
]


@pytest.mark.parametrize("beta,wd,wu,loss_type,pattern,shift", CASES)
def test_loss_matches_formula(beta, wd, wu, loss_type, pattern, shift):
    g = torch.Generator().manual_seed(hash((beta, pattern)) % 2**31)
    n = 7
    pol, ref = -50 * torch.rand(n, generator=g, dtype=torch.float64), -50 * torch.rand(n, generator=g, dtype=torch.float64)
    ref_kl = -50 * torch.rand(n, generator=g, dtype=torch.float64)
    pol_kl = ref_kl + shift + torch.randn(n, generator=g, dtype=torch.float64) * 0.1
    labels = {"mixed": torch.tensor([1, 0, 1, 1, 0, 0, 1]), "all_desirable": torch.ones(n),
              "all_undesirable": torch.zeros(n)}[pattern].bool()
    out = kto_loss(pol, ref, labels, policy_kl_logps=pol_kl, reference_kl_logps=ref_kl, beta=beta, desirable_weight=wd, undesirable_weight=wu,
                   loss_type=loss_type)
    loss, losses, rewards, z0 = formula(pol.tolist(), ref.tolist(), pol_kl.tolist(), ref_kl.tolist(),
                                        labels.tolist(), beta, wd, wu, loss_type)
    assert out.loss.item() == pytest.approx(loss, rel=1e-6)
    assert out.losses.tolist() == pytest.approx(losses, rel=1e-6)
    assert out.rewards.tolist() == pytest.approx(rewards, rel=1e-6)
    expected_kl = z0 if loss_type == "kto" else 0.0
    assert out.kl.item() == pytest.approx(expected_kl, abs=1e-9)
    if shift < 0 and loss_type == "kto":
        assert out.kl.item() == 0.0


def test_worked_example_by_hand():
    # r = [2, -2], z0 = mean([1, 3]) = 2, beta = 0.5:
    # desirable: 1 - sigmoid(0.5 * (2 - 2)) = 0.5; undesirable: 1 - sigmoid(0.5 * (2 + 2)) = 1 - sigmoid(2)
    out = kto_loss(torch.tensor([-8.0, -12.0]), torch.tensor([-10.0, -10.0]), torch.tensor([True, False]),
                   policy_kl_logps=torch.tensor([-4.0, -2.0]), reference_kl_logps=torch.tensor([-5.0, -5.0]), beta=0.5)
    assert out.kl.item() == pytest.approx(2.0)
    assert out.losses.tolist() == pytest.approx([0.5, 1 - 1 / (1 + math.exp(-2))])
    assert out.rewards.tolist() == pytest.approx([1.0, -1.0])


def test_no_gradient_through_z0():
    pol = torch.tensor([-3.0, -4.0], requires_grad=True)
    pol_kl = torch.tensor([-1.0, -2.0], requires_grad=True)
    out = kto_loss(pol, torch.tensor([-5.0, -5.0]), torch.tensor([True, False]), policy_kl_logps=pol_kl,
                   reference_kl_logps=torch.tensor([-3.0, -3.0]))
    out.loss.backward()
    assert pol_kl.grad is None  # z0 is detached: KL log-probs get no gradient at all
    assert pol.grad is not None and torch.all(pol.grad != 0)
    # and the direction is right: desirable log-prob pushed up (negative grad of the loss), undesirable down
    assert pol.grad[0] < 0 < pol.grad[1]


def test_z0_is_clamped_and_detached():
    z0 = z0_estimate(torch.tensor([-10.0, -10.0], requires_grad=True), torch.tensor([-1.0, -1.0]))
    assert z0.item() == 0.0 and not z0.requires_grad


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type"):
        kto_loss(torch.zeros(1), torch.zeros(1), torch.ones(1), z0=torch.zeros(()), loss_type="dpo")


def test_given_z0_replaces_the_kl_rows():
    args = (torch.tensor([-3.0, -4.0]), torch.tensor([-5.0, -5.0]))
    labels = torch.tensor([True, False])
    from_rows = kto_loss(*args, labels, policy_kl_logps=torch.tensor([-1.0, -2.0]),
                         reference_kl_logps=torch.tensor([-3.0, -3.0]))
    given = kto_loss(*args, labels, z0=torch.tensor(1.5))
    assert from_rows.kl.item() == given.kl.item() == 1.5
    torch.testing.assert_close(from_rows.losses, given.losses)
    assert kto_loss(*args, labels, z0=torch.tensor(-2.0)).kl.item() == 0.0  # still clamped


def test_kto_needs_a_reference_point():
    with pytest.raises(ValueError, match="z0"):
        kto_loss(torch.zeros(2), torch.zeros(2), torch.ones(2).bool())
