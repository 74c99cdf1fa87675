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

from kto_lite.model import base_model, eval_mode, within_rounding
from kto_lite.training.batching import Rows, collate, collate_shared
from kto_lite.training.head import output_head
from kto_lite.training.packing import SEGMENT_PREFIX, efficient_packing, segment_masks, use_segment_attention

_packing_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {probe span: packed == padded}
_sharing_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {probe span: shared == alone}


def _hidden_states(base, rows: Rows) -> torch.Tensor:
    """The body's last hidden states, (B, T, H); packed rows get position ids and no mask."""
    if rows.packed:
        use_segment_attention(base)  # sdpa/eager: attend sequence by sequence, not over the whole pack
    with segment_masks(rows.position_ids, rows.branch):  # packed: masks of the diagonal blocks only
        return base.get_decoder()(input_ids=rows.input_ids, attention_mask=rows.attention_mask,
                                  position_ids=rows.position_ids, use_cache=False).last_hidden_state


def predictors(rows: Rows) -> torch.Tensor:
    """(B, T): the position whose hidden state predicts each token, -1 where none does.

    The token before it in the same sequence; on shared-prompt rows (batching.collate_shared) the
    first token of each completion is predicted by the last token of its prompt.
    """
    if rows.predictor is not None:
        return rows.predictor
    index = rows.sequence_index
    previous = torch.arange(-1, index.shape[1] - 1, device=index.device).expand_as(index)
    same_sequence = torch.zeros_like(index, dtype=torch.bool)
    same_sequence[:, 1:] = (index[:, 1:] == index[:, :-1]) & (index[:, 1:] >= 0)
    return torch.where(same_sequence, previous, -1)


def completion_logps(model, rows: Rows, chunk_size: int | None = None) -> torch.Tensor:
    """Sum of log p(token) over completion tokens, per sequence: `Rows` -> (n_sequences,) float32.

    A token is predicted from the position before it, in the same sequence (`predictors`): the first
    token of a sequence (and, packed, the first of each) is never scored.
    """
    token_logps, sequence = completion_token_logps(model, rows, chunk_size)  # (M,), (M,)
    sums = torch.zeros(rows.n_sequences, dtype=torch.float32, device=rows.input_ids.device)
    return sums.index_add(0, sequence, token_logps.float())  # (n_sequences,)


def completion_token_logps(model, rows: Rows, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p of every scored completion token, (M,), and the sequence each belongs to, (M,): the terms
    `completion_logps` sums (humanline clamps them one by one). The same rows give the same token order."""
    base = base_model(model)
    head = output_head(base)  # raises UnsupportedHead for a head we would get wrong
    hidden = _hidden_states(base, rows)  # (B, T, H)
    predictor = predictors(rows)  # (B, T)
    b, t = torch.nonzero(rows.completion_mask.bool() & (predictor >= 0), as_tuple=True)  # the scored tokens
    token_logps = head.token_logps(hidden[b, predictor[b, t]], rows.input_ids[b, t], chunk_size)  # (M,)
    return token_logps, rows.sequence_index[b, t]


def supports_packing(model, max_length: int | None = None) -> bool:
    """Whether padding-free rows give this model the same log-probs as padded rows, at no extra cost.

    The attention implementation must handle packed position ids efficiently (sdpa and eager through
    packing.py's per-sequence wrapper; flash-attention's varlen kernels; flex attention's block
    masks), and the architecture must restart its positions and mask from them: checked once per
    model on two random sequences, packed against each alone, the first longer than the model's sliding
    window or attention chunk when rows of max_length can be (`probe_span`). A model that ignores
    position_ids, builds its mask another way, or whose attention is not given position_ids (Llama-4's
    computes positions from the row itself) gets the padded path.
    """
    base = base_model(model)
    span = probe_span(base, max_length)
    checked = _packing_checked.setdefault(base, {})
    if span not in checked:
        impl = use_segment_attention(base) if base.config._attn_implementation in ("sdpa", "eager") else (
            base.config._attn_implementation)
        checked[span] = efficient_packing(impl) and _packed_equals_separate(base, span)
    return checked[span]


def probe_span(base, max_length: int | None) -> int:
    """Tokens a layout probe's rows must exceed: the model's shortest sliding window or attention chunk, where
    the run's rows (max_length) can be longer than it; 0 otherwise (short rows see everything a long one would)."""
    spans = [getattr(base.config, name, None) for name in ("sliding_window", "attention_chunk_size")]
    span = min((s for s in spans if isinstance(s, int) and s > 0), default=0)
    return span if span and (max_length is None or span < max_length) else 0


def _random_tokens(base, *groups) -> list[list[list[int]]]:
    """Token ids for the layout checks: per group of lengths, one random sequence per length (seeded)."""
    vocab = base.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    return [[torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths] for lengths in groups]


# What a model's code raises when it cannot take a layout (it reshapes the mask itself, its attention does not
# forward position_ids, shapes that do not broadcast): "unsupported", so the probe falls back. Out of memory is
# none of these: it is re-raised (`_is_out_of_memory`), never mistaken for "unsupported".
UNSUPPORTED = (TypeError, AttributeError, IndexError, KeyError, ValueError, NotImplementedError, RuntimeError)


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


@torch.no_grad()
def _in_both_layouts(base, together, alone) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(together(), alone()) computed in eval mode without grad; None where the model's code cannot take
    the combined layout (e.g. it reshapes the mask itself)."""
    with eval_mode(base):
        try:
            return together(), alone()
        except UNSUPPORTED as e:
            if _is_out_of_memory(e):
                raise
            return None


def attention_implementation(model) -> str:
    """The model's attention kernel as transformers names it (kto_lite's segment wrappers named by what they wrap)."""
    return base_model(model).config._attn_implementation.removeprefix(SEGMENT_PREFIX)


def _packed_equals_separate(base, span: int) -> bool:
    device = base.get_output_embeddings().weight.device
    (sequences,) = _random_tokens(base, (max(5, span + 2), 7))  # the first crosses the window / chunk
    both = _in_both_layouts(
        base, lambda: _hidden_states(base, collate(sequences, [[], []], 0, packed=True).to(device))[0],  # (12, H)
        lambda: torch.cat([_hidden_states(base, collate([s], [[]], 0).to(device))[0] for s in sequences]))
    if both is None:
        return False
    packed, alone = both
    return within_rounding(packed, alone, half=packed.dtype in (torch.float16, torch.bfloat16))


def supports_shared_prompts(model, max_length: int | None = None) -> bool:
    """Whether shared-prompt rows (batching.collate_shared) give this model each completion's own log-probs.

    They need packing through kto_lite's segment attention (sdpa or eager), which composes the
    prompt-and-own-completion structure with the model's own mask (packing.py: causal, sliding window or
    chunks; anything else is refused); flash and flex attention take transformers' packed path, which
    would not. Checked once per model on random sequences, each completion against itself alone, the
    first prompt's rows longer than the model's window or chunk (`probe_span`).
    """
    base = base_model(model)
    span = probe_span(base, max_length)
    checked = _sharing_checked.setdefault(base, {})
    if span not in checked:
        checked[span] = (supports_packing(base, max_length) and base.config._attn_implementation.startswith(
            SEGMENT_PREFIX) and _shared_equals_separate(base, span))
    return checked[span]


def _shared_equals_separate(base, span: int) -> bool:
    device = base.get_output_embeddings().weight.device
    # prompt 0 with either completion crosses the window / chunk, in the prompt and in the completions
    prompts, first, second = _random_tokens(base, (max(5, span - 1), 3), (4, 6), (7, 2))
    both = _in_both_layouts(
        base, lambda: completion_logps(base, collate_shared(prompts, [first, second]).to(device)),
        lambda: torch.cat([completion_logps(base, collate(prompts, c, 0).to(device)) for c in (first, second)]))
    if both is None:
        return False
    shared, alone = both
    return within_rounding(shared, alone, half=base.dtype in (torch.float16, torch.bfloat16))


class PolicyLogps(torch.nn.Module):
    """`completion_logps` as a module's forward, so DDP (via accelerate) sees the forward and syncs grads."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, rows: Rows, per_token: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return completion_token_logps(self.model, rows) if per_token else completion_logps(self.model, rows)

