"""From tokenized examples to batches: per-epoch order, mismatched (KL) pairs, padded tensors.

Design: the order and the KL pairing of an epoch are pure functions of (seed, epoch, dataset). So
- any process, and a resumed run, recomputes exactly the same batches (no sampler state to save);
- the KL pairing is global (example i is paired with example kl_partners[i], anywhere in the
  data), so it works at batch size 1, unlike pairing inside a micro-batch;
- reference log-probs can be cached per example and per epoch's pairing: reshuffling the order
  never invalidates them (see reference.py).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .data import TokenizedExample


def _rng(seed: int, epoch: int, salt: int) -> random.Random:
    return random.Random(f"{seed}-{epoch}-{salt}")


def kl_partners(n: int, *, seed: int, epoch: int) -> list[int]:
    """A random derangement: partner[i] != i for every i (n >= 2), new for every epoch.

    Sattolo's algorithm gives a uniformly random single cycle, which never maps i to itself.
    With n == 1 there is no other example; the example is paired with itself and z0 is 0.
    """
    partner = list(range(n))
    rng = _rng(seed, epoch, salt=1)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i (strictly): what makes it a single cycle
        partner[i], partner[j] = partner[j], partner[i]
    return partner


def epoch_batches(
    lengths: Sequence[int],
    labels: Sequence[bool],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
    megabatch: int = 64,
) -> list[list[int]]:
    """Every example index exactly once, in batches, reshuffled each epoch.

    With group_by_length, a random window of `megabatch * batch_size` examples is split by label,
    each side sorted by length, and batch k takes the k-th length slice of *both* sides in
    proportion: little padding, and every batch keeps the window's desirable/undesirable mix (the
    reason KTO's z0 and both loss terms see both kinds). Batch order is then shuffled.
    """
    rng = _rng(seed, epoch, salt=2)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches = []
    window = megabatch * batch_size
    for w in range(0, len(order), window):
        chunk = order[w : w + window]
        good = sorted((i for i in chunk if labels[i]), key=lambda i: lengths[i])
        bad = sorted((i for i in chunk if not labels[i]), key=lambda i: lengths[i])
        taken_good = taken_bad = 0
        for end in range(batch_size, len(chunk) + batch_size, batch_size):
            end = min(end, len(chunk))
            # the first `end` examples hold each label in the window's proportion
            upto_good = round(end * len(good) / len(chunk))
            upto_bad = end - upto_good
            batches.append(good[taken_good:upto_good] + bad[taken_bad:upto_bad])
            taken_good, taken_bad = upto_good, upto_bad
    rng.shuffle(batches)
    return batches


def collate(
    prompts: Sequence[list[int]],
    completions: Sequence[list[int]],
    pad_token_id: int,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) input_ids, attention_mask and completion_mask for prompt+completion pairs.

    A KL row is a prompt with *another* example's completion, so both come in separately; when the
    pair is longer than max_length the completion tail is cut (the prompt already fits).
    """
    rows = []
    for p, c in zip(prompts, completions, strict=True):
        if max_length is not None:
            c = c[: max(max_length - len(p), 0)]
        rows.append((p, c))
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        input_ids[b, :n] = torch.tensor(p + c, dtype=torch.long)
        attention_mask[b, :n] = 1
        completion_mask[b, len(p) : n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def kto_batch(
    examples: Sequence[TokenizedExample],
    indices: Sequence[int],
    partners: Sequence[int],
    pad_token_id: int,
    max_length: int,
) -> dict[str, torch.Tensor]:
    """The examples at `indices` and their KL rows (own prompt + partner's completion)."""
    batch = collate([examples[i].prompt_ids for i in indices], [examples[i].completion_ids for i in indices],
                    pad_token_id)
    kl = collate([examples[i].prompt_ids for i in indices],
                 [examples[partners[i]].completion_ids for i in indices], pad_token_id, max_length)
    batch.update({f"kl_{k}": v for k, v in kl.items()})
    batch["labels"] = torch.tensor([examples[i].label for i in indices], dtype=torch.bool)
    batch["index"] = torch.tensor(list(indices), dtype=torch.long)
    return batch
