"""Sequence log-probs of completions, without ever building a (batch x length x vocab) tensor.

The naive way (`model(...).logits.log_softmax(-1)`) materialises B*T*V logits, in fp32 for the
softmax: for a 152k vocabulary, batch 4 and 1,024 tokens that alone is 2.5 GB, plus its gradient.
Here the model body runs to hidden states, only the hidden states that predict a completion token
are kept, and the frozen output head + log-softmax run on chunks of them (head.py), so one
(chunk x V) block of logits is alive at a time.

Rows come padded (B, T) with an attention mask, or packed (1, sum of lengths) with position ids
restarting per sequence and no mask (padding-free; packing.py): the body never computes a padding
token, and attention stays inside each sequence.
"""

from __future__ import annotations

import weakref

import torch

from .batching import Rows, collate
from .head import output_head
from .packing import efficient_packing, segment_masks, use_segment_attention

_packing_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> packed == padded on it


def _base_model(model):
    """The transformers *ForCausalLM under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _hidden_states(base, rows: Rows) -> torch.Tensor:
    """The body's last hidden states, (B, T, H); packed rows get position ids and no mask."""
    if rows.packed:
        use_segment_attention(base)  # sdpa/eager: attend sequence by sequence, not over the whole pack
    with segment_masks(rows.position_ids):  # packed: masks of the diagonal blocks only
        return base.get_decoder()(input_ids=rows.input_ids, attention_mask=rows.attention_mask,
                                  position_ids=rows.position_ids, use_cache=False).last_hidden_state


def completion_logps(model, rows: Rows, chunk_size: int | None = None) -> torch.Tensor:
    """Sum of log p(token) over completion tokens, per sequence: `Rows` -> (n_sequences,) float32.

    A token is predicted from the position before it, in the same sequence: the first token of a
    sequence (and, packed, the first of each) is never scored.
    """
    base = _base_model(model)
    head = output_head(base)  # raises UnsupportedHead for a head we would get wrong
    hidden = _hidden_states(base, rows)  # (B, T, H)

    index = rows.sequence_index[:, 1:]  # (B, T-1) sequence of each predicted token; -1 on padding
    same_sequence = (index == rows.sequence_index[:, :-1]) & (index >= 0)
    scored = rows.completion_mask[:, 1:].bool() & same_sequence  # (B, T-1): which next-token predictions count
    positions = torch.nonzero(scored, as_tuple=True)
    hidden = hidden[:, :-1][positions]  # (M, H), M = completion tokens in the batch
    targets = rows.input_ids[:, 1:][positions]  # (M,)
    token_logps = head.token_logps(hidden, targets, chunk_size)  # (M,)
    sums = torch.zeros(rows.n_sequences, dtype=torch.float32, device=rows.input_ids.device)
    return sums.index_add(0, index[positions], token_logps.float())  # (n_sequences,)


def supports_packing(model) -> bool:
    """Whether padding-free rows give this model the same log-probs as padded rows, at no extra cost.

    The attention implementation must handle packed position ids efficiently (sdpa and eager through
    packing.py's per-sequence wrapper; flash-attention's varlen kernels; flex attention's block
    masks), and the architecture must restart its positions and mask from them: checked once per
    model on two short random sequences, packed against each alone (a model that ignores
    position_ids, or builds its mask another way, gets the padded path).
    """
    base = _base_model(model)
    if base not in _packing_checked:
        impl = use_segment_attention(base) if base.config._attn_implementation in ("sdpa", "eager") else (
            base.config._attn_implementation)
        _packing_checked[base] = efficient_packing(impl) and _packed_equals_separate(base)
    return _packing_checked[base]


@torch.no_grad()
def _packed_equals_separate(base) -> bool:
    device = base.get_output_embeddings().weight.device
    vocab = base.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 7)]
    was_training = base.training
    base.eval()
    try:
        packed = _hidden_states(base, collate(sequences, [[], []], 0, packed=True).to(device))[0]  # (12, H)
        alone = torch.cat([_hidden_states(base, collate([s], [[]], 0).to(device))[0] for s in sequences])
    except (TypeError, AttributeError, IndexError, ValueError, RuntimeError):
        return False  # the model's code cannot take a packed row (e.g. it reshapes the mask itself)
    finally:
        base.train(was_training)
    half = packed.dtype in (torch.float16, torch.bfloat16)
    tolerance = (3e-2 if half else 1e-4) * (1 + alone.abs().max().item())
    return bool((packed.float() - alone.float()).abs().max() <= tolerance)


class PolicyLogps(torch.nn.Module):
    """`completion_logps` as a module's forward, so DDP (via accelerate) sees the forward and syncs grads."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, rows: Rows) -> torch.Tensor:
        return completion_logps(self.model, rows)

