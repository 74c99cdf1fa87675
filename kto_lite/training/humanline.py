"""Humanline KTO: a reference that follows the policy, and clamped per-token log-ratios (docs/methods.md).

Liu, Muennighoff and Ethayarajh (2025, "Humanline: Online Alignment as Perceptual Loss", arXiv 2509.24207;
the authors' HALOs repository) change two things in KTO, both made here:
1. the reference is synced to the policy every humanline_sync_steps optimizer steps. kto_lite's reference is the
   same base under a second, frozen LoRA adapter named "reference" (model.reference_mode switches to it), so a
   sync copies the trained adapter's weights into it: no second copy of the base;
2. each completion's log-ratio is the sum of its tokens' log-ratios, each clamped to [log_epsilon_P,
   log_epsilon_R] (loss.humanline_log_ratios), for the examples and for the KL rows of z0 alike; the KTO loss
   (loss.kto_loss) then takes it in place of log pi(y|x) - log pi_ref(y|x).

Why the reference log-probs are computed at every step rather than before training (reference.py): the cache
holds one number per sequence from a fixed reference; humanline needs one per token, from a reference that
moves. Computing them for the micro-batch at hand costs one no-grad forward (one for an example and its KL row
on shared-prompt rows), what `precompute_reference: false` costs plain KTO; per-token columns computed ahead
would all be stale after the first sync.

Resuming: a checkpoint's reference is its own policy when its step is a multiple of humanline_sync_steps
(config.py makes save_steps one); a checkpoint written on a stop request may fall between two syncs, and is
resumed with the reference synced at the checkpoint (said when it happens).
"""

from __future__ import annotations

from functools import partial

import torch

from kto_lite.config import TrainConfig
from kto_lite.model import has_reference_adapter, no_grad_policy, reference_mode
from kto_lite.training.logps import completion_token_logps
from kto_lite.training.loss import KTOLossOutput, humanline_log_ratios, kto_loss, z0_estimate


class Humanline:
    """The "reference" adapter that follows the trained one, and the humanline KTO loss of a micro-batch."""

    def __init__(self, config: TrainConfig, model, accelerator):
        self.config, self.model, self.accelerator = config, model, accelerator
        if not has_reference_adapter(model):  # reference: init_adapter already holds one (the starting policy)
            model.add_adapter("reference", model.peft_config["default"])
            model.set_adapter("default")  # the trained adapter stays the active, trainable one
        params = dict(model.named_parameters())
        self.pairs = [(p, params[name.replace(".default.", ".reference.")]) for name, p in params.items()
                      if "lora_" in name and ".default." in name]  # (trained, reference) weights
        for _, reference in self.pairs:
            reference.requires_grad_(False)
        if config.precompute_reference:
            accelerator.print("humanline: the reference follows the policy, so its log-probs are computed per token "
                              "at every step (precompute_reference does not apply)")
        self.sync()

    # ------------------------------------------------------------------ the reference follows the policy
    @torch.no_grad()
    def sync(self) -> None:
        """reference <- policy: copy the trained adapter's weights into the reference adapter."""
        for trained, reference in self.pairs:
            reference.copy_(trained)

    def begin(self, start: int) -> None:
        """Before the first step (or a resumed run's next one): the reference is the policy as it is now."""
        if start % self.config.humanline_sync_steps:
            self.accelerator.print(f"humanline: step {start} falls between two syncs (every "
                                   f"{self.config.humanline_sync_steps} steps); the reference is synced now")
        self.sync()

    def step_done(self, step: int) -> None:
        if step % self.config.humanline_sync_steps == 0:
            self.sync()

    # ------------------------------------------------------------------ the loss of one micro-batch
    def loss(self, recipe, mb) -> tuple[KTOLossOutput, torch.Tensor]:
        """(KTO loss on humanline's clamped log-ratios, (B,) policy log-probs of the examples for the metrics).

        The policy's tokens go through `recipe.policy` (DDP sees the forward whose gradients it syncs); the
        reference's, and the policy's on separate KL rows, are no-grad passes of the same model."""
        n, model, c = len(mb), recipe.model, self.config
        ratios = partial(humanline_log_ratios, log_epsilon_P=c.log_epsilon_P, log_epsilon_R=c.log_epsilon_R)
        policy, sequence = recipe.policy(mb.rows, per_token=True)  # (M,) with grad, (M,)
        with recipe.accelerator.autocast(), reference_mode(model):
            reference, _ = completion_token_logps(model, mb.rows)  # (M,)
        if mb.shared:  # sequences 0..n-1 the examples, n..2n-1 their KL rows (detached by z0_estimate)
            both = ratios(policy, reference, sequence, 2 * n)  # (2n,)
            r, r_kl = both[:n], both[n:]
        else:
            r = ratios(policy, reference, sequence, n)  # (n,)
            with recipe.accelerator.autocast(), no_grad_policy(model):
                policy_kl, kl_sequence = completion_token_logps(model, mb.kl_rows)
            with recipe.accelerator.autocast(), reference_mode(model):
                reference_kl, _ = completion_token_logps(model, mb.kl_rows)
            r_kl = ratios(policy_kl, reference_kl, kl_sequence, n)
        # every process uses the same z0 (docs/design.md): the sums and counts are added over all of them
        reduce = partial(recipe.accelerator.reduce, reduction="sum") if recipe.world > 1 else None
        z0 = z0_estimate(r_kl, torch.zeros_like(r_kl), keep=mb.kl_completion_lengths() > 0, reduce=reduce)
        out = kto_loss(r, torch.zeros_like(r), mb.labels, z0=z0, **recipe.loss_settings)
        policy_logps = torch.zeros(2 * n if mb.shared else n, device=policy.device).index_add(
            0, sequence, policy.detach().float())[:n]  # (n,) log pi(y|x), for logps/chosen and /rejected
        return out, policy_logps
