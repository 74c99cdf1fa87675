"""The KTO loss (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization").

Pure tensor math: no model, no I/O, no communication between processes. Every log-prob argument is
a per-example sequence log-prob, i.e. the sum of log p(token) over the completion tokens only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


class KTOLossOutput(NamedTuple):
    loss: torch.Tensor  # () mean of `losses`
    losses: torch.Tensor  # (B,) weighted per-example losses
    rewards: torch.Tensor  # (B,) beta * (policy - reference), detached
    kl: torch.Tensor  # () z0, the detached and clamped reference point


def z0_estimate(policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor, *, keep: torch.Tensor | None = None,
                reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """z0 = max(0, mean_j [log pi(y'_j|x_j) - log pi_ref(y'_j|x_j)]), detached (the reference point of eq. 7).

    y'_j is the completion of *another* example (a mismatched pair), so this is a cheap, biased
    estimate of KL(pi || pi_ref). Shapes: (M,) and (M,) -> (). The one estimator of kto_lite:
    - keep (M,) bool: the rows that count (the authors' code leaves out KL rows whose completion
      max_length cut away entirely); None: all of them;
    - the sum and the count are taken in float64 (never averaged in half precision), and `reduce`
      (a sum over processes of a (2,) tensor) makes every process use the same z0;
    - no KL row anywhere: z0 = 0.
    """
    diff = (policy_kl_logps - reference_kl_logps).detach()  # (M,)
    dtype = torch.promote_types(diff.dtype, torch.float32)  # the result: never half precision
    diff = diff.double() if keep is None else diff.double()[keep]
    total = torch.stack([diff.sum(), diff.new_tensor(diff.numel())])  # (2,) sum, count
    if reduce is not None:
        total = reduce(total)
    return (total[0] / total[1].clamp(min=1)).clamp(min=0).to(dtype)


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    labels: torch.Tensor,
    *,
    z0: torch.Tensor | None = None,
    policy_kl_logps: torch.Tensor | None = None,
    reference_kl_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> KTOLossOutput:
    """Paper eq. 7 (loss_type "kto"), or APO-zero's unpaired form ("apo_zero_unpaired").

    With r_i = log pi(y_i|x_i) - log pi_ref(y_i|x_i) (policy_logps - reference_logps, shapes (B,)):
      kto:                desirable:   lambda_D * (1 - sigmoid(beta * (r_i - z0)))
                          undesirable: lambda_U * (1 - sigmoid(beta * (z0 - r_i)))
      apo_zero_unpaired:  desirable:   lambda_D * (1 - sigmoid(beta * r_i))
                          undesirable: lambda_U * sigmoid(beta * r_i)       (no z0 is used)
    `labels` (B,) is True for desirable examples. `z0` (see `z0_estimate`), or the KL rows' log-probs
    (M,) to estimate it from, is detached and clamped at 0: no gradient flows through it. Returns the mean loss, per-example losses, rewards
    beta * r_i (detached, as logged) and z0 (0 for apo_zero_unpaired).
    """
    labels = labels.bool()
    r = policy_logps - reference_logps  # (B,)
    r = r.to(torch.promote_types(r.dtype, torch.float32))
    if loss_type == "kto":
        if z0 is None:
            if policy_kl_logps is None or reference_kl_logps is None:
                raise ValueError("loss_type 'kto' needs z0, or the KL rows' log-probs to estimate it")
            z0 = z0_estimate(policy_kl_logps, reference_kl_logps)
        z0 = z0.detach().to(r.dtype).clamp(min=0)
        desirable_losses = 1 - torch.sigmoid(beta * (r - z0))
        undesirable_losses = 1 - torch.sigmoid(beta * (z0 - r))
    elif loss_type == "apo_zero_unpaired":
        z0 = torch.zeros((), device=r.device)
        desirable_losses = 1 - torch.sigmoid(beta * r)
        undesirable_losses = torch.sigmoid(beta * r)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; use 'kto' or 'apo_zero_unpaired'")
    losses = torch.where(labels, desirable_weight * desirable_losses, undesirable_weight * undesirable_losses)
    return KTOLossOutput(losses.mean(), losses, (beta * r).detach(), z0)


def humanline_log_ratios(policy_token_logps: torch.Tensor, reference_token_logps: torch.Tensor,
                         sequence_index: torch.Tensor, n_sequences: int, *, log_epsilon_P: float,
                         log_epsilon_R: float) -> torch.Tensor:
    """Humanline's log-ratio of a completion (Liu, Muennighoff, Ethayarajh 2025, "Humanline: Online Alignment as
    Perceptual Loss"): each token's log-ratio clamped to [log eps_P, log eps_R], then summed per sequence,

        r_i = sum_t clamp(log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t), log eps_P, log eps_R)

    in place of KTO's log pi(y|x) - log pi_ref(y|x) (docs/methods.md). A token outside the range contributes the
    bound and no gradient (as PPO's clipped ratio); the reference is never differentiated. Shapes: the tokens'
    log-probs (M,) and (M,), the sequence each token belongs to (M,) -> (n_sequences,) float32.
    """
    ratio = (policy_token_logps.float() - reference_token_logps.detach().float()).clamp(log_epsilon_P, log_epsilon_R)
    return ratio.new_zeros(n_sequences).index_add(0, sequence_index, ratio)  # (n_sequences,)
