"""Per-epoch order, KL pairing and collation."""

from collections import Counter

import pytest
import torch

from kto_lite.training.batching import collate, epoch_batches, kl_partners


@pytest.mark.parametrize("n", [2, 3, 10, 101])
def test_kl_partners_never_self_and_is_a_permutation(n):
    for epoch in range(3):
        partners = kl_partners(n, seed=7, epoch=epoch)
        assert sorted(partners) == list(range(n))
        assert all(p != i for i, p in enumerate(partners))


def test_kl_partners_change_across_epochs_and_follow_the_seed():
    assert kl_partners(50, seed=1, epoch=0) != kl_partners(50, seed=1, epoch=1)
    assert kl_partners(50, seed=1, epoch=0) != kl_partners(50, seed=2, epoch=0)
    assert kl_partners(50, seed=1, epoch=3) == kl_partners(50, seed=1, epoch=3)  # reproducible (resume)


def test_single_example_pairs_with_itself():
    assert kl_partners(1, seed=0, epoch=0) == [0]


@pytest.mark.parametrize("group_by_length", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_every_example_exactly_once_per_epoch(group_by_length, batch_size):
    lengths = [(i * 37) % 90 + 5 for i in range(203)]
    labels = [i % 3 != 0 for i in range(203)]
    for epoch in range(2):
        batches = epoch_batches(lengths, labels, batch_size, seed=3, epoch=epoch, group_by_length=group_by_length)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(203))
        assert all(1 <= len(b) <= batch_size for b in batches)
        assert sum(len(b) < batch_size for b in batches) <= (203 // (64 * batch_size)) + 1


def test_order_changes_each_epoch():
    lengths, labels = [10] * 40, [True, False] * 20
    assert epoch_batches(lengths, labels, 4, seed=0, epoch=0) != epoch_batches(lengths, labels, 4, seed=0, epoch=1)


def test_length_grouping_mixes_labels_and_cuts_padding():
    # desirable answers short, undesirable long: plain length sorting would make one-sided batches
    lengths = [20 + i % 7 if i % 2 else 200 + i % 11 for i in range(512)]
    labels = [bool(i % 2) for i in range(512)]
    grouped = epoch_batches(lengths, labels, 8, seed=0, epoch=0, group_by_length=True)
    mixes = Counter(sum(labels[i] for i in b) for b in grouped)
    assert set(mixes) == {4}  # every batch 4 desirable + 4 undesirable, as in the data
    # padding within each label side is what remains; compare to random batches on the same data
    def padding(batches, side):
        return sum(max(lengths[i] for i in b if labels[i] == side) * sum(labels[i] == side for i in b)
                   - sum(lengths[i] for i in b if labels[i] == side) for b in batches if any(labels[i] == side for i in b))
    plain = epoch_batches(lengths, labels, 8, seed=0, epoch=0, group_by_length=False)
    assert padding(grouped, True) < padding(plain, True) / 2


def test_collate_masks_and_kl_truncation():
    rows = collate([[1, 2, 3], [4]], [[5, 6], [7, 8, 9, 10]], pad_token_id=0, max_length=4)
    assert rows.input_ids.tolist() == [[1, 2, 3, 5], [4, 7, 8, 9]]  # completion tail cut to max_length
    assert rows.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert rows.completion_mask.tolist() == [[0, 0, 0, 1], [0, 1, 1, 1]]
    assert rows.input_ids.dtype == torch.long and not rows.packed
    both = collate([[1, 2], [3]], [[4], [5]], pad_token_id=9)
    assert both.input_ids.tolist() == [[1, 2, 4], [3, 5, 9]]  # right padding
    assert both.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert both.completion_mask.tolist() == [[0, 0, 1], [0, 1, 0]]
    assert both.sequence_index.tolist() == [[0, 0, 0], [1, 1, -1]]
    assert both.tokens() == 5 and both.completion_lengths().tolist() == [1, 1]


def test_packed_rows_restart_positions_and_hold_no_padding():
    rows = collate([[1, 2], [3]], [[4], [5, 6, 7]], pad_token_id=9, max_length=3, packed=True)
    assert rows.packed and rows.attention_mask is None
    assert rows.input_ids.tolist() == [[1, 2, 4, 3, 5, 6]]  # second completion cut to max_length 3
    assert rows.position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]
    assert rows.sequence_index.tolist() == [[0, 0, 0, 1, 1, 1]]
    assert rows.completion_mask.tolist() == [[0, 0, 1, 0, 1, 1]]
    assert rows.tokens() == 6 and rows.completion_lengths().tolist() == [1, 2]


# ---------------------------------------------------------------------- KL partners of similar length
def completion_lengths(n, seed=0):
    import math
    import random

    rng = random.Random(seed)  # log-normal, as real completions: a few very long ones
    return [max(1, round(80 * math.exp(rng.gauss(0, 0.8)))) for _ in range(n)]


@pytest.mark.parametrize("n", [2, 3, 9, 10, 101])
@pytest.mark.parametrize("group", [2, 3, 8])
def test_length_aware_partners_stay_a_derangement(n, group):
    for epoch in range(4):
        for lengths in (completion_lengths(n, epoch), [5] * n):  # spread lengths, and all ties
            partners = kl_partners(n, seed=1, epoch=epoch, lengths=lengths, group=group)
            assert sorted(partners) == list(range(n))  # every completion used exactly once
            assert all(p != i for i, p in enumerate(partners))


def test_length_aware_partners_are_a_pure_function_reshuffled_each_epoch():
    lengths = completion_lengths(200)
    first = kl_partners(200, seed=4, epoch=0, lengths=lengths)
    assert first == kl_partners(200, seed=4, epoch=0, lengths=list(lengths))  # resume recomputes the same
    assert first != kl_partners(200, seed=4, epoch=1, lengths=lengths)
    assert first != kl_partners(200, seed=5, epoch=0, lengths=lengths)
    ties = kl_partners(200, seed=4, epoch=0, lengths=[7] * 200)  # equal lengths: still random pairs
    assert ties != kl_partners(200, seed=4, epoch=1, lengths=[7] * 200)
    with pytest.raises(ValueError, match="lengths"):
        kl_partners(3, seed=0, epoch=0, lengths=[1, 2])


def kl_padding_ratio(prompt_lengths, lengths, partners, batches):
    """Positions of padded KL-row batches / their real tokens."""
    positions = real = 0
    for batch in batches:
        kl = [prompt_lengths[i] + lengths[partners[i]] for i in batch]
        positions += max(kl) * len(kl)
        real += sum(kl)
    return positions / real


def test_length_aware_partners_cut_kl_padding():
    n = 512
    lengths, prompts = completion_lengths(n, 1), completion_lengths(n, 2)
    prompts = [p // 2 for p in prompts]
    labels = [i % 3 != 0 for i in range(n)]
    batches = epoch_batches([p + c for p, c in zip(prompts, lengths)], labels, 8, seed=0, epoch=0)
    random_pairs = kl_partners(n, seed=0, epoch=0)
    similar = kl_partners(n, seed=0, epoch=0, lengths=lengths)
    before = kl_padding_ratio(prompts, lengths, random_pairs, batches)
    after = kl_padding_ratio(prompts, lengths, similar, batches)
    examples = kl_padding_ratio(prompts, lengths, list(range(n)), batches)  # the examples' own padding
    assert before > 1.5 and after < 1.25 * examples, (before, after, examples)
    assert sum(abs(lengths[i] - lengths[p]) for i, p in enumerate(similar)) < 0.1 * sum(
        abs(lengths[i] - lengths[p]) for i, p in enumerate(random_pairs))
