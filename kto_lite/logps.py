"""Sequence log-probs of completions, without ever building a (batch x length x vocab) tensor.

The naive way (`model(...).logits.log_softmax(-1)`) materialises B*T*V logits, in fp32 for the
softmax: for a 152k vocabulary, batch 4 and 1,024 tokens that alone is 2.5 GB, plus its gradient.
Here the model body runs to hidden states, only the hidden states that predict a completion token
are kept, and the output head + log-softmax run on chunks of them. In backward each chunk is
recomputed (activation checkpointing), so only one (chunk x V) block of logits is ever alive.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .batching import Rows

CHUNK_ELEMENTS = 2**25  # logits per output-head chunk: 128 MiB in fp32 (~16 bytes/logit alive in backward)


def chunk_rows(vocab_size: int) -> int:
    """Token rows per chunk: 1024 for a 32k vocabulary, 221 for Qwen's 152k, 128 for Gemma's 256k."""
    return max(64, CHUNK_ELEMENTS // vocab_size)


def _base_model(model):
    """The transformers *ForCausalLM under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None):
    logits = head(hidden).float()  # (chunk, V) fp32: the only vocabulary-sized tensor
    if softcap:  # Gemma-2 style final logit soft-capping
        logits = softcap * torch.tanh(logits / softcap)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)  # (chunk,)


def completion_logps(model, rows: Rows, chunk_size: int | None = None) -> torch.Tensor:
    """Sum of log p(token) over completion tokens, per sequence: `Rows` -> (n_sequences,) float32.

    A token is predicted from the position before it, in the same sequence: the first token of a
    sequence (and, packed, the first of each) is never scored.
    """
    base = _base_model(model)
    body, head = base.get_decoder(), base.get_output_embeddings()
    hidden = body(input_ids=rows.input_ids, attention_mask=rows.attention_mask, position_ids=rows.position_ids,
                  use_cache=False).last_hidden_state  # (B, T, H)

    same_sequence = rows.sequence_index[:, 1:] == rows.sequence_index[:, :-1]
    scored = rows.completion_mask[:, 1:].bool() & same_sequence  # (B, T-1): which next-token predictions count
    positions = torch.nonzero(scored, as_tuple=True)
    hidden = hidden[:, :-1][positions]  # (M, H), M = completion tokens in the batch
    targets = rows.input_ids[:, 1:][positions]  # (M,)
    softcap = getattr(base.config, "final_logit_softcapping", None)
    chunk_size = chunk_size or chunk_rows(head.weight.shape[0])

    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled():  # recompute the chunk's logits in backward instead of keeping them
            pieces.append(checkpoint(_token_logps, head, h, t, softcap, use_reentrant=False))
        else:
            pieces.append(_token_logps(head, h, t, softcap))
    token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(rows.n_sequences, dtype=torch.float32, device=rows.input_ids.device)
    return sums.index_add(0, rows.sequence_index[:, 1:][positions], token_logps)  # (n_sequences,)


class PolicyLogps(torch.nn.Module):
    """`completion_logps` as a module's forward, so DDP (via accelerate) sees the forward and syncs grads."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, rows: Rows) -> torch.Tensor:
        return completion_logps(self.model, rows)


def supports_packing(model) -> bool:
    """Whether `completion_logps` may pack this model's rows (padding-free). Until packing is proven per
    architecture, the padded layout is used."""
    return False
