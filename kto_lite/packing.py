"""Padding-free (packed) rows: which models can take them, and attention that costs no more than padding.

A packed micro-batch is one row holding several sequences back to back, with `position_ids`
restarting at 0 for each (batching.collate(..., packed=True)). transformers (masking_utils
`find_packed_sequence_indices`) sees the restarts when no attention mask is given and builds the
block-diagonal causal mask itself (also the sliding-window one); flash-attention takes the varlen
path from the same position ids (`_is_packed_sequence`, `prepare_fa_kwargs_from_position_ids`). So
attention never crosses sequences, and no padding token goes through the model.

One catch: sdpa and eager then attend over the whole (sum of lengths)^2 block mask, most of it
masked. With 8 rows of ~500 tokens that is 8x the attention work of padded rows, and eager holds
(heads, T, T) fp32 scores per layer. `use_segment_attention` wraps the model's sdpa or eager
function so that a packed row is attended sequence by sequence, on the diagonal blocks of the same
mask: exactly the same numbers, with the work (and memory) of the sequences alone. Every other call
(padded rows, generation with a cache) goes to the original function unchanged.
"""

from __future__ import annotations

import sys
import weakref

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

SEGMENT_PREFIX = "kto_lite_segments_"  # + the wrapped implementation: kto_lite_segments_sdpa, ..._eager
VARLEN = ("flash_attention", "flex_attention")  # transformers' own packed path (varlen kernels, block masks)
_last_bounds: tuple = (lambda: None, None)  # (weakref to a position_ids tensor, its segments): one lookup per forward


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def segments(position_ids: torch.Tensor | None) -> list[tuple[int, int]] | None:
    """[(start, end)] of the sequences packed in a (1, T) position_ids row; None if it holds only one.

    A new sequence starts wherever a position is not the previous one + 1: transformers' own rule
    (masking_utils.find_packed_sequence_indices), so the segments are exactly the mask's blocks.
    """
    global _last_bounds
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    if _last_bounds[0]() is position_ids:  # the same tensor goes to every layer: one device sync per forward
        return _last_bounds[1]
    row = position_ids[0]
    starts = (torch.nonzero(row[1:] != row[:-1] + 1).flatten() + 1).tolist()
    bounds = None
    if starts:
        edges = [0, *starts, row.shape[0]]
        bounds = list(zip(edges[:-1], edges[1:]))
    _last_bounds = (weakref.ref(position_ids), bounds)
    return bounds


def _eager(module):
    """The eager attention of the module's own modeling file (Gemma-2's has softcapping, for one)."""
    return sys.modules[type(module).__module__].eager_attention_forward


def _segment_attention(impl: str):
    """The `impl` ("sdpa" or "eager") attention function, applied to each packed sequence on its own."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        original = _eager(module) if impl == "eager" else AttentionInterface._global_mapping[impl]
        # query (1, heads, T, D); key, value (1, kv_heads, T, D); attention_mask (1, 1, T, T) or None
        bounds = segments(kwargs.get("position_ids"))
        if bounds is None or not query.shape[2] == key.shape[2] == kwargs["position_ids"].shape[1]:
            return original(module, query, key, value, attention_mask, **kwargs)
        outputs = []
        for start, end in bounds:
            block = attention_mask[..., start:end, start:end] if attention_mask is not None else None
            out, _ = original(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                              block, **kwargs)
            outputs.append(out)  # (1, end - start, heads, D)
        return torch.cat(outputs, dim=1), None  # (1, T, heads, D); no attention weights

    return attention


def use_segment_attention(model) -> str:
    """Switch an sdpa/eager model to its segment-wise wrapper (idempotent); returns the implementation in use.

    The wrapper gives the same results as the function it wraps on every input, packed or not, so the
    switch is permanent: gradient checkpointing recomputes layers in backward with the same function.
    """
    base = _base(model)
    impl = base.config._attn_implementation
    modeling = sys.modules[type(base).__module__]
    wrappable = impl == "sdpa" or (impl == "eager" and hasattr(modeling, "eager_attention_forward"))
    if wrappable and base._can_set_attn_implementation():  # the model calls AttentionInterface functions
        name = SEGMENT_PREFIX + impl
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _segment_attention(impl))
            AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[impl])
        base.set_attn_implementation(name)
    return base.config._attn_implementation


def efficient_packing(impl: str | None) -> bool:
    """Whether packed rows cost no more attention than padded ones with this attention implementation."""
    return bool(impl) and (impl.startswith(SEGMENT_PREFIX) or any(v in impl for v in VARLEN))
