"""Padding-free (packed) rows: attention that stays inside each sequence and costs what the sequences cost.

A packed micro-batch is one row holding several sequences back to back, with `position_ids`
restarting at 0 for each (batching.collate(..., packed=True)). transformers (masking_utils
`find_packed_sequence_indices`) sees the restarts when no attention mask is given and builds the
block-diagonal causal mask itself (sliding-window masks too); flash-attention takes its varlen path
from the same position ids (`_is_packed_sequence`, `prepare_fa_kwargs_from_position_ids`). So
attention never crosses sequences, and no padding token goes through the model.

The catch with sdpa and eager: that mask is dense, (N x N) for N packed tokens, and attention runs
over all of it, mostly masked. With 8 rows of ~500 tokens that is 8x the attention work of padded
rows (measured: packed twice as slow as padded on CPU), an (N x N) mask per forward, and eager's
(heads, N, N) fp32 scores. `use_segment_attention` switches an sdpa/eager model to a wrapper of the
same function that, on a packed row, attends sequence by sequence:
- masks: while `segment_masks` is active (logps does it for packed rows), transformers' mask
  builder is asked for each diagonal block alone (same mask function, with the block's offsets:
  causal, sliding window, whatever the model composes), giving `BlockMasks`: sum of n_i^2, not N^2;
- attention: each sequence's queries, keys and values with its block. Off-diagonal blocks are all
  masked, so this is the same computation without the masked part;
- shared-prompt rows (batching.collate_shared): the block's mask is the model's own mask function
  (causal, sliding window, Llama-4's chunks), evaluated on positions as if each completion followed its
  prompt alone, and-ed with "a completion sees its prompt and itself". A mask that cannot be rebuilt
  that way (the model's own and/or mask functions, a bidirectional model) is refused (`UncomposableMask`),
  so the layout probe falls back to separate rows.
Everything else (padded rows, generation with a cache) goes to the original function unchanged.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import weakref
from contextvars import ContextVar

import torch
import transformers.masking_utils as masking
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from kto_lite.model import base_model

SEGMENT_PREFIX = "kto_lite_segments_"  # + the wrapped implementation: kto_lite_segments_sdpa, ..._eager
VARLEN = ("flash_attention", "flex_attention")  # transformers' own packed path (varlen kernels, block masks)
_active_segments: ContextVar[tuple | None] = ContextVar("kto_lite_packed_segments", default=None)  # (bounds, branch)
_last_bounds: tuple = (lambda: None, None)  # (weakref to a position_ids tensor, its segments): one lookup per forward


class BlockMasks(tuple):
    """The diagonal blocks of a packed row's attention mask, one (1, 1, n_i, n_i) mask (or None) per sequence.

    `bounds` holds the blocks' (start, end): the attention uses them instead of reading the position ids
    (a shared-prompt row's positions jump back at each completion, inside one block). A copy made by code
    that rebuilds tuples (FSDP's mixed-precision cast of a layer's inputs) loses the attribute: its bounds
    then come from the blocks' sizes.
    """

    _bounds: list[tuple[int, int]] | None = None

    @property
    def bounds(self) -> list[tuple[int, int]] | None:
        if self._bounds is None and self and all(m is not None for m in self):
            edges = [0, *itertools.accumulate(m.shape[-1] for m in self)]
            return list(zip(edges[:-1], edges[1:]))
        return self._bounds

    @bounds.setter
    def bounds(self, value: list[tuple[int, int]]) -> None:
        self._bounds = value


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


@contextlib.contextmanager
def segment_masks(position_ids: torch.Tensor | None, branch: torch.Tensor | None = None):
    """While active, masks built for this packed row come as BlockMasks (only the diagonal blocks).

    With `branch` (a shared-prompt row, batching.collate_shared) a block is one prompt with its
    completions: it starts where the position ids restart at 0, and a completion's tokens attend to the
    prompt and to their own completion only (`shared_prompt_mask`).
    """
    if branch is not None:
        starts = torch.nonzero(position_ids[0] == 0).flatten().tolist()
        state = (list(zip(starts, [*starts[1:], position_ids.shape[1]])), branch[0], position_ids[0])
    else:
        state = (segments(position_ids), None, None)
    token = _active_segments.set(state if state[0] is not None else None)
    try:
        yield
    finally:
        _active_segments.reset(token)


def shared_prompt_mask(branch: torch.Tensor):
    """transformers mask function (batch, head, query index, key index) -> allowed, over a whole packed row: the
    shared-prompt structure alone. Causal in the row, and a completion (branch k > 0) sees the prompt (branch 0)
    and itself, not its siblings. `_shared_mask_function` ands it with the model's own mask."""

    def allowed(batch_idx, head_idx, q_idx, kv_idx):
        key_branch = branch[kv_idx]
        return (kv_idx <= q_idx) & ((key_branch == 0) | (key_branch == branch[q_idx]))

    return allowed


class UncomposableMask(NotImplementedError):
    """The model's attention mask cannot be rebuilt for shared-prompt rows (the layout probe: unsupported)."""


def _own_mask_function(kwargs: dict):
    """The model's mask function as transformers' mask creators build it before packing, from what they pass
    the mask builder: causal; a sliding window (local_size = config.sliding_window); Llama-4's chunks
    (local_size = config.attention_chunk_size). and/or mask functions of the model's own (use_vmap) cannot be
    taken apart from the packed row's: refused."""
    config, size = kwargs.get("config"), kwargs.get("local_size")
    if kwargs.get("use_vmap"):
        raise UncomposableMask("the model adds its own and/or attention mask functions, which shared prompts "
                               "cannot compose with")
    window, chunk = getattr(config, "sliding_window", None), getattr(config, "attention_chunk_size", None)
    if size is None:
        return masking.causal_mask_function
    if size == chunk and size != window:
        return masking.chunked_causal_mask_function(size, torch.zeros(1, dtype=torch.long))
    if size == window and size != chunk:
        return masking.sliding_window_causal_mask_function(size)
    raise UncomposableMask(f"a local attention of {size} tokens that is neither the config's sliding_window "
                           f"({window}) nor its attention_chunk_size ({chunk}) alone, which shared prompts cannot "
                           "compose with")


def _shared_mask_function(kwargs: dict, branch: torch.Tensor, positions: torch.Tensor):
    """The mask of a shared-prompt row: the structure (`shared_prompt_mask`) and the model's own mask evaluated on
    positions, so that each completion gets the causal / window / chunk mask it would get alone after its prompt."""
    own_positions = masking.remap_positions_for_packed_sequence(_own_mask_function(kwargs), positions[None])
    return masking.and_masks(shared_prompt_mask(branch), own_positions)


def _check_composed(own, given, positions: torch.Tensor, start: int, end: int) -> None:
    """Compare our mask of the block [start, end) with the one transformers composed itself, where that one is
    right: within each run of consecutive positions (a prompt with its first completion, each later
    completion). Any other difference (an overlay, a bidirectional model) is refused, not trained wrong."""
    index = torch.arange(start, end, device=positions.device)
    block = positions[start:end]
    run = torch.cat([block.new_zeros(1), (block[1:] != block[:-1] + 1).long()]).cumsum(0)  # (n,)
    same_run = run[:, None] == run[None]  # (n, n)
    zero = index.new_zeros(())
    q, k = index[:, None], index[None]
    if not torch.equal(own(zero, zero, q, k) & same_run, given(zero, zero, q, k).to(index.device) & same_run):
        raise UncomposableMask("the model's attention mask is not causal, sliding or chunked on positions, which "
                               "shared prompts cannot compose with")


def _block_mask_builder(impl: str):
    """transformers' `impl` mask builder, asked for the diagonal blocks alone while segment_masks is active."""
    original = AttentionMaskInterface._global_mapping[impl]

    def build(batch_size, q_length, kv_length, **kwargs):
        active = _active_segments.get()
        whole = (batch_size == 1 and q_length == kv_length and not kwargs.get("q_offset")
                 and not kwargs.get("kv_offset") and kwargs.get("attention_mask") is None)
        if active is None or not whole or active[0][-1][1] != q_length:
            return original(batch_size, q_length, kv_length, **kwargs)
        bounds, branch, positions = active
        if branch is not None:  # prompts with their completions: the model's mask composed, never skipped for is_causal
            own = _shared_mask_function(kwargs, branch, positions)
            for start, end in bounds:
                _check_composed(own, kwargs["mask_function"], positions, start, end)
            kwargs = {**kwargs, "mask_function": own, "allow_is_causal_skip": False}
        # the mask function indexes the packed position ids by absolute position: offsets select the block
        masks = BlockMasks(original(1, end - start, end - start, **{**kwargs, "q_offset": start, "kv_offset": start})
                           for start, end in bounds)
        masks.bounds = bounds
        return masks

    return build


def _eager(module):
    """The eager attention of the module's own modeling file (Gemma-2's has soft-capping, for one)."""
    return sys.modules[type(module).__module__].eager_attention_forward


def _segment_attention(impl: str):
    """The `impl` ("sdpa" or "eager") attention function, applied to each packed sequence on its own."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        # query (1, heads, N, D); key, value (1, kv_heads, N, D); attention_mask (1, 1, N, N), BlockMasks or None
        original = _eager(module) if impl == "eager" else AttentionInterface._global_mapping[impl]
        bounds = attention_mask.bounds if isinstance(attention_mask, BlockMasks) else None
        position_ids = kwargs.get("position_ids")  # (1, N); a model whose attention is not given them: not packed
        bounds = bounds or segments(position_ids)
        if bounds is None or position_ids is None or not query.shape[2] == key.shape[2] == position_ids.shape[1]:
            if isinstance(attention_mask, BlockMasks):  # packed, but the model's attention was not told the positions
                raise NotImplementedError(f"{type(module).__name__} is not given position_ids: it cannot take "
                                          "packed rows (it may compute positions from the row itself)")
            return original(module, query, key, value, attention_mask, **kwargs)
        outputs = []
        for i, (start, end) in enumerate(bounds):
            if isinstance(attention_mask, BlockMasks):
                block = attention_mask[i]
            else:  # a dense packed mask (built without segment_masks): its diagonal block
                block = attention_mask[..., start:end, start:end] if attention_mask is not None else None
            out, _ = original(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                              block, **kwargs)
            outputs.append(out)  # (1, n_i, heads, D)
        return torch.cat(outputs, dim=1), None  # (1, N, heads, D); no attention weights

    return attention


def use_segment_attention(model) -> str:
    """Switch an sdpa/eager model to its segment-wise wrapper (idempotent); returns the implementation in use.

    The wrapper gives the same results as the function it wraps on every input, packed or not, so the
    switch is permanent: gradient checkpointing recomputes layers in backward with the same function.
    Models that do not call attention through AttentionInterface keep theirs.
    """
    base = base_model(model)
    impl = base.config._attn_implementation
    modeling = sys.modules[type(base).__module__]
    wrappable = impl == "sdpa" or (impl == "eager" and hasattr(modeling, "eager_attention_forward"))
    if wrappable and base._can_set_attn_implementation():
        name = SEGMENT_PREFIX + impl
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _segment_attention(impl))
            AttentionMaskInterface.register(name, _block_mask_builder(impl))
        base.set_attn_implementation(name)
    return base.config._attn_implementation


def efficient_packing(impl: str | None) -> bool:
    """Whether packed rows cost no more attention than padded ones with this attention implementation."""
    return bool(impl) and (impl.startswith(SEGMENT_PREFIX) or any(v in impl for v in VARLEN))
