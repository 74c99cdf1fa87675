"""The frozen output head: log p(target) from hidden states, in chunks, with the model's own logits.

`token_logps` computes log_softmax(f(hidden @ W^T + b))[target] for M hidden states without a
(M x vocab) tensor: chunk by chunk, the logits live only while their chunk is processed. f is what
the architecture does to its logits after the linear layer (`OutputHead`):
- Cohere: logits * logit_scale; Granite: logits / logits_scaling; Falcon-H1: * lm_head_multiplier;
- Gemma-2/3: softcap * tanh(logits / softcap) (`final_logit_softcapping`).
Any other head is refused (`UnsupportedHead`) rather than trained on a different distribution: the
first call compares f(head(h)) with the model's own forward on a few tokens (`check_output_head`).

Backward without recomputing the logits. The head's weight is frozen (LoRA does not adapt it), so
only the gradient w.r.t. the hidden state h_i is needed, and for a per-token output it does not
depend on the upstream gradient except through one scalar: with s = f(z), z = W h_i + b,
    d log p_i / d h_i = W^T [ f'(z) * (onehot(target_i) - softmax(s)) ]          (H,)
so forward computes it from the chunk's softmax while the logits are there, keeps (M, H) of them
(the size of the hidden states themselves), and backward is one multiply: grad_h = g_i * J_i. The
recompute-in-backward alternative (activation checkpointing) pays the (chunk x V) matmul twice.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from kto_lite.errors import ConfigError
from kto_lite.model import base_model, eval_mode, keep_4bit_layout_trainable, within_rounding

BLOCK_BYTES = 2**27  # working memory of the head: (rows x vocab) logits and their companions, 128 MiB

# architectures that transform their logits after lm_head: model_type -> scale read from the config
LOGIT_SCALES = {
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), lambda c: c.logit_scale),
    **dict.fromkeys(("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa",
                     "granitemoe_swa"), lambda c: 1.0 / c.logits_scaling),
    "falcon_h1": lambda c: c.lm_head_multiplier,
}
_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # models whose head was compared to forward


def bytes_per_logit(*, half: bool, softcap: bool) -> int:
    """Working set per logit of a chunk: fp32 logits, + a half-precision copy (the matmul's output, then the
    softmax gradient for the J matmul), + tanh' when soft-capped (with grad)."""
    return 4 + (2 if half else 0) + (4 if softcap else 0)


def chunk_rows(vocab_size: int, *, half: bool = False, softcap: bool = False) -> int:
    """Rows per chunk whose working set fits BLOCK_BYTES: 1,048 for a 32k vocabulary in fp32, 147 for
    Qwen's 152k in bf16, 52 for Gemma's 256k in bf16 with soft-capping."""
    return max(16, BLOCK_BYTES // (bytes_per_logit(half=half, softcap=softcap) * vocab_size))


class UnsupportedHead(ConfigError):
    """The model's logits are not what kto_lite's head computes from its hidden states."""


@dataclass
class OutputHead:
    """logits = softcap(scale * (hidden @ weight^T + bias)), as the model computes them."""

    module: torch.nn.Module  # the model's output embeddings (lm_head)
    scale: float = 1.0
    softcap: float | None = None

    @property
    def frozen_linear(self) -> bool:
        """A plain, frozen linear layer (FSDP's sharded one too): the fast path. (LoRA on lm_head, say, goes the
        generic way.)"""
        return (isinstance(self.module, torch.nn.Linear) and type(self.module).forward is torch.nn.Linear.forward
                and not any(p.requires_grad for p in self.module.parameters()))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, H) -> (N, V) fp32 logits: the plain computation, for the generic path and the check."""
        logits = self.module(hidden).float() * self.scale
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    def rows_per_chunk(self, dtype: torch.dtype) -> int:
        return chunk_rows(self.module.weight.shape[0], half=dtype in (torch.float16, torch.bfloat16),
                          softcap=bool(self.softcap))

    def token_logps(self, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """(M, H) hidden states, (M,) target ids -> (M,) float32 log p(target) (float64 for a float64 head)."""
        if not (self.frozen_linear and hasattr(self.module, "unshard")):
            return self._token_logps(hidden, targets, chunk_size)
        self.module.unshard()  # its own FSDP unit (train.shard): whole only while it computes; backward needs none of it
        try:
            return self._token_logps(hidden, targets, chunk_size)
        finally:
            self.module.reshard()

    def _token_logps(self, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
        chunk = chunk_size or self.rows_per_chunk(self.module.weight.dtype)
        if self.frozen_linear:
            return FrozenHeadLogps.apply(hidden, self.module.weight, self.module.bias, targets, self.scale,
                                         self.softcap, chunk)
        pieces = []
        for start in range(0, hidden.shape[0], chunk):  # generic: recompute each chunk's logits in backward
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            if torch.is_grad_enabled():
                pieces.append(checkpoint(self._generic, h, t, use_reentrant=False))
            else:
                pieces.append(self._generic(h, t))
        return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)

    def _generic(self, hidden, targets):
        logits = self.logits(hidden)  # (chunk, V)
        return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


class FrozenHeadLogps(torch.autograd.Function):
    """log_softmax(softcap(scale * (h W^T + b)))[target] per row; gradient w.r.t. h only (W, b frozen)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, softcap, chunk):
        # hidden (M, H), weight (V, H), bias (V,) or None, targets (M,) -> (M,) float32
        want_grad = ctx.needs_input_grad[0]
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp32 logits (fp64 for gradcheck)
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_grad else None  # J: d out_i / d hidden_i, (M, H)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h, t = hidden[rows].to(weight.dtype), targets[rows, None]
            z = torch.nn.functional.linear(h, weight, bias).to(acc)  # (chunk, V) fp32: the only big tensor
            if scale != 1.0:
                z.mul_(scale)
            if softcap:
                z.div_(softcap).tanh_()
                slope = z.square().neg_().add_(1) if want_grad else None  # d cap(s) / ds = 1 - tanh^2
                z.mul_(softcap)
            target_logit = z.gather(1, t)  # (chunk, 1)
            peak = z.amax(1, keepdim=True)
            z.sub_(peak).exp_()
            total = z.sum(1, keepdim=True)
            out[rows] = (target_logit - peak - total.log()).squeeze(1)  # log p = s_t - logsumexp(s)
            if want_grad:
                z.div_(total)  # softmax(s)
                z.scatter_add_(1, t, torch.full_like(target_logit, -1.0))  # softmax - onehot = -d log p / ds
                if softcap:
                    z.mul_(slope)
                    del slope
                if scale != 1.0:
                    z.mul_(scale)
                grad_hidden[rows] = (z.to(weight.dtype) @ weight).neg_().to(hidden.dtype)  # (chunk, H)
            del z
        if want_grad:
            ctx.save_for_backward(grad_hidden)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_out[:, None].to(grad_hidden.dtype), None, None, None, None, None, None


def output_head(model) -> OutputHead:
    """The model's output head with its logit transform; checked against its forward on first use."""
    base = base_model(model)
    config = base.config.get_text_config()
    scale = LOGIT_SCALES.get(config.model_type, lambda c: 1.0)(config)
    head = OutputHead(base.get_output_embeddings(), float(scale if scale is not None else 1.0),
                      getattr(config, "final_logit_softcapping", None) or None)
    if base not in _checked:
        check_output_head(base, head)
        _checked[base] = True
    return head


@torch.no_grad()
def check_output_head(base, head: OutputHead) -> None:
    """Refuse a model whose own log-softmax differs from the head's on a few tokens (UnsupportedHead)."""
    vocab = head.module.weight.shape[0]
    device = head.module.weight.device
    ids = (torch.arange(3, 11, device=device) * 7919 % vocab)[None]  # 8 arbitrary valid tokens, (1, 8)

    keep_4bit_layout_trainable(base)  # this eval no-grad pass must not repack 4-bit weights (model.py says why)
    with eval_mode(base):  # no dropout: both passes see the same hidden states
        own = base(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)  # (1, 8, V)
        hidden = base.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0]  # (8, H)
        ours = head.logits(hidden).log_softmax(-1)
    error = (own[0] - ours).abs().max().item() if own.shape[-1] == ours.shape[-1] else float("inf")
    if not within_rounding(ours, own[0], half=head.module.weight.dtype in (torch.float16, torch.bfloat16)):
        raise UnsupportedHead(
            f"{type(base).__name__} (model_type {config_type(base)!r}) computes its logits differently from its "
            f"output layer: its own log-probs differ from log_softmax(lm_head(hidden)"
            f"{f' * {head.scale:g}' if head.scale != 1 else ''}{' capped' if head.softcap else ''}) by {error:.3g}. "
            "kto_lite would train on a different distribution than the model's, so it refuses. Supported: plain "
            "linear heads, logit scaling (Cohere, Granite, Falcon-H1) and final logit soft-capping (Gemma-2/3).")


def config_type(base) -> str:
    return getattr(base.config, "model_type", "?")
