"""From tokenized examples to batches: per-epoch order, mismatched (KL) pairs, padded tensors.

Design: the order and the KL pairing of an epoch are pure functions of (seed, epoch, dataset). So
- any process, and a resumed run, recomputes exactly the same batches (no sampler state to save);
- the KL pairing is global (example i is paired with example kl_partners[i], anywhere in the
  data), so it works at batch size 1, unlike pairing inside a micro-batch;
- reference log-probs can be cached per example and per epoch's pairing: reshuffling the order
  never invalidates them (see reference.py).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def _rng(seed: int, epoch: int, salt: int) -> random.Random:
    return random.Random(f"{seed}-{epoch}-{salt}")


def kl_partners(n: int, *, seed: int, epoch: int, lengths: Sequence[int] | None = None, group: int = 8) -> list[int]:
    """A random derangement: partner[i] != i for every i (n >= 2), new for every epoch.

    Example i's KL row is its own prompt with example partner[i]'s completion. Without `lengths`
    (completion lengths), any other example can be the partner: Sattolo's algorithm gives a
    uniformly random single cycle, which never maps i to itself. With `lengths`, partners have
    completions of similar length, so a micro-batch's KL rows are about as long as its (length-
    grouped) examples: the examples are sorted by completion length (ties broken at random), cut
    into runs of `group` (the cut points move every epoch), and each run is one random cycle.

    What this changes for z0 (paper eq. 8, z_ref = E_x'[KL(pi_theta(y'|x') || pi_ref(y'|x'))] estimated
    on mismatched pairs): every completion is still used exactly once per epoch, so the completions
    y' keep their distribution; only which prompt they are paired with now correlates with the
    length of that prompt's own answer. y' is still another example's answer, never x's own.
    With n == 1 there is no other example; the example is paired with itself and z0 is 0.
    """
    partner = list(range(n))
    rng = _rng(seed, epoch, salt=1)
    if lengths is None:
        runs = [list(range(n))]
    else:
        if len(lengths) != n:
            raise ValueError(f"kl_partners: {len(lengths)} lengths for {n} examples")
        tiebreak = [rng.random() for _ in range(n)]
        order = sorted(range(n), key=lambda i: (lengths[i], tiebreak[i]))
        cuts = [0, *range(rng.randrange(1, group + 1), n, group), n]
        runs = [order[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
        if len(runs) > 1 and len(runs[0]) == 1:  # a run of one would pair an example with itself
            runs[:2] = [runs[0] + runs[1]]
        if len(runs) > 1 and len(runs[-1]) == 1:
            last = runs.pop()
            runs[-1] = runs[-1] + last
    for run in runs:
        cycle = list(range(len(run)))
        for i in range(len(run) - 1, 0, -1):
            j = rng.randrange(i)  # j < i (strictly): what makes it a single cycle
            cycle[i], cycle[j] = cycle[j], cycle[i]
        for k, member in enumerate(run):
            partner[member] = run[cycle[k]]
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


@dataclass
class Rows:
    """Token sequences to score, as the model takes them.

    Padded: (B, T) right-padded rows with an attention mask. Packed (padding-free): B = 1, the
    sequences concatenated into one row whose position_ids restart at 0 for each, so attention never
    crosses sequences and no padding is computed. `sequence_index` maps every token to its sequence,
    so log-probs are summed the same way in both layouts.
    """

    input_ids: torch.Tensor  # (B, T)
    completion_mask: torch.Tensor  # (B, T) 1 on completion tokens: the scored ones
    sequence_index: torch.Tensor  # (B, T) which of the n_sequences a token belongs to; -1 on padding
    n_sequences: int
    attention_mask: torch.Tensor | None = None  # (B, T) padded layout only
    position_ids: torch.Tensor | None = None  # (1, T) packed layouts only
    branch: torch.Tensor | None = None  # (1, T) shared-prompt layout: 0 on a prompt, k on its k-th completion
    predictor: torch.Tensor | None = None  # (1, T) shared-prompt layout: the position that predicts each token

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    def to(self, device) -> Rows:
        move = {f.name: v.to(device) if isinstance(v, torch.Tensor) else v
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}
        return Rows(**move)

    def tokens(self, n: int | None = None) -> int:
        """Real (non-padding) tokens of the first n sequences (default: all). A shared prompt counts once,
        for the first of its completions."""
        index = self.sequence_index
        return int(((index >= 0) & (index < (n if n is not None else self.n_sequences))).sum())

    def completion_lengths(self) -> torch.Tensor:
        """(n_sequences,) completion tokens per sequence; 0 for a KL row whose completion was cut away."""
        counts = torch.zeros(self.n_sequences, dtype=torch.long, device=self.input_ids.device)
        scored = self.completion_mask.bool()
        return counts.index_add(0, self.sequence_index[scored], torch.ones_like(self.sequence_index[scored]))


def collate(
    prompts: Sequence[list[int]],
    completions: Sequence[list[int]],
    pad_token_id: int,
    max_length: int | None = None,
    *,
    packed: bool = False,
) -> Rows:
    """Prompt+completion pairs as `Rows`: right-padded (B, T), or packed into one (1, sum of lengths) row.

    A KL row is a prompt with *another* example's completion, so both come in separately; when the
    pair is longer than max_length the completion tail is cut (the prompt already fits).
    """
    rows = []
    for p, c in zip(prompts, completions, strict=True):
        if max_length is not None:
            c = c[: max(max_length - len(p), 0)]
        rows.append((p, c))
    if packed:
        ids = [t for p, c in rows for t in p + c]
        is_completion = [int(i >= len(p)) for p, c in rows for i in range(len(p) + len(c))]
        return Rows(
            input_ids=torch.tensor([ids], dtype=torch.long),
            completion_mask=torch.tensor([is_completion], dtype=torch.long),
            sequence_index=torch.tensor([[b for b, (p, c) in enumerate(rows) for _ in range(len(p) + len(c))]]),
            n_sequences=len(rows),
            position_ids=torch.tensor([[i for p, c in rows for i in range(len(p) + len(c))]]),
        )
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    sequence_index = torch.full((len(rows), width), -1, dtype=torch.long)
    for b, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        input_ids[b, :n] = torch.tensor(p + c, dtype=torch.long)
        attention_mask[b, :n] = 1
        completion_mask[b, len(p) : n] = 1
        sequence_index[b, :n] = b
    return Rows(input_ids, completion_mask, sequence_index, len(rows), attention_mask=attention_mask)


def collate_shared(prompts: Sequence[list[int]], branches: Sequence[Sequence[list[int]]],
                   max_length: int | None = None) -> Rows:
    """Each prompt once, followed by several completions that attend to it and to themselves only.

    branches[k][i] is the k-th completion of prompts[i] (in training: k = 0 the example's own, k = 1
    its KL partner's; in the reference pass also every later epoch's partner). One packed row holds,
    per prompt, [prompt | completion 0 | completion 1 | ...]. Position ids restart at 0 for each
    prompt and at len(prompt) for each completion; `branch` tells the attention (packing.py) that a
    completion sees its prompt and itself, not the other completions; `predictor` tells
    completion_logps that a completion's first token is predicted from the prompt's last token. So
    every completion gets the log-probs it would get alone after its prompt, and the prompt is computed
    once instead of once per completion. Sequence k * B + i is completion k of prompt i: log-probs come
    out as (K * B,). A completion longer than max_length - len(prompt) loses its tail, as in collate.
    """
    ids, completion, sequence, position, branch, predictor = [], [], [], [], [], []
    for i, prompt in enumerate(prompts):
        start = len(ids)
        ids += prompt
        completion += [0] * len(prompt)
        sequence += [i] * len(prompt)
        position += range(len(prompt))
        branch += [0] * len(prompt)
        predictor += [start - 1 + j if j else -1 for j in range(len(prompt))]
        last_prompt_token = start + len(prompt) - 1 if prompt else -1  # -1: nothing predicts it
        for k, completions in enumerate(branches):
            tokens = completions[i][: max(max_length - len(prompt), 0)] if max_length is not None else completions[i]
            first = len(ids)
            ids += tokens
            completion += [1] * len(tokens)
            sequence += [k * len(prompts) + i] * len(tokens)
            position += range(len(prompt), len(prompt) + len(tokens))
            branch += [k + 1] * len(tokens)
            predictor += [first - 1 + j if j else last_prompt_token for j in range(len(tokens))]

    def row(values):
        return torch.tensor([values], dtype=torch.long)

    return Rows(input_ids=row(ids), completion_mask=row(completion), sequence_index=row(sequence),
                n_sequences=len(prompts) * len(branches), position_ids=row(position), branch=row(branch),
                predictor=row(predictor))
