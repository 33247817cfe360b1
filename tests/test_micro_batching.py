"""Token-budget packing, with padding shares worked by hand."""

from __future__ import annotations

import pytest

from learners.group import shard_by_tokens
from learners.micro_batching import pack_by_token_budget


def test_sorted_greedy_packing_and_padding_share():
    # Lengths 10, 3, 8, 4, 9 with a budget of 20 tokens (rows × longest row).
    # Sorted longest first: 10 (i0), 9 (i4), 8 (i2), 4 (i3), 3 (i1).
    # [10, 9] costs 2×10 = 20 ≤ 20; adding 8 would cost 30. [8, 4] costs 16; adding 3 would cost 24. [3] costs 3.
    plan = pack_by_token_budget([10, 3, 8, 4, 9], token_budget=20)
    assert plan.batches == [[0, 4], [2, 3], [1]]
    assert plan.real_tokens == 34
    assert plan.padded_tokens == 20 + 16 + 3
    # Pads: 1 (9 under 10) + 4 (4 under 8) + 0 = 5 of 39.
    assert plan.pad_tokens == 5
    assert plan.padding_share == pytest.approx(5 / 39)


def test_equal_lengths_have_no_padding():
    plan = pack_by_token_budget([6, 6, 6, 6], token_budget=12)
    assert plan.batches == [[0, 1], [2, 3]]
    assert plan.padding_share == 0.0


def test_a_row_longer_than_the_budget_gets_its_own_micro_batch():
    plan = pack_by_token_budget([50, 5, 5], token_budget=16)
    assert plan.batches == [[0], [1, 2]]
    assert plan.padded_tokens == 50 + 10


def test_ties_keep_input_order_and_every_index_appears_once():
    lengths = [4, 7, 4, 7, 1, 4]
    plan = pack_by_token_budget(lengths, token_budget=14)
    assert plan.batches == [[1, 3], [0, 2, 5], [4]]
    assert sorted(i for b in plan.batches for i in b) == list(range(len(lengths)))
    # Pads: 0 + 0 + 0 over 14 + 12 + 1.
    assert plan.padding_share == 0.0


def test_empty_input_and_bad_arguments():
    plan = pack_by_token_budget([], token_budget=8)
    assert plan.batches == [] and plan.padding_share == 0.0
    with pytest.raises(ValueError):
        pack_by_token_budget([3], token_budget=0)
    with pytest.raises(ValueError):
        pack_by_token_budget([0, 3], token_budget=8)


def test_shards_balance_tokens_across_ranks():
    # Longest first onto the lightest shard: 9→A, 7→B, 5→B (7 < 9), 3→A (9 < 12); at equal loads (12, 12) and equal
    # row counts, 2 goes to the first shard, A. Each shard lists its indices in input order.
    assert shard_by_tokens([5, 9, 2, 7, 3], 2) == [[1, 2, 4], [0, 3]]
    with pytest.raises(ValueError):
        shard_by_tokens([5], 2)


def test_prompt_groups_share_a_micro_batch_within_the_budget():
    """Prompt A (10 tokens) has responses of 6, 4, 5; B (8 tokens) has 3 and 3; C (7) is alone, with 2.
    Budget 30: A's group costs 10 + 3 × 6 = 28 (its rows padded to 6), B's 8 + 2 × 3 = 14, C goes to the ordinary
    packer. Real tokens 10 + 15, 8 + 6, 9; computed 28, 14, 9."""
    from learners.micro_batching import pack_prompt_groups

    keys = ["A", "B", "A", "C", "A", "B"]
    prompts = [10, 8, 10, 7, 10, 8]
    responses = [6, 3, 4, 2, 5, 3]
    plan = pack_prompt_groups(keys, prompts, responses, token_budget=30)
    assert plan.batches == [[0, 4, 2], [1, 5], [3]] and plan.shared == [True, True, False]
    assert (plan.real_tokens, plan.padded_tokens) == (25 + 14 + 9, 28 + 14 + 9)
    # A budget of 25 splits A's group: 10 + 2 × 6 = 22 fits, a third row (28) does not; the rest shares alone.
    tight = pack_prompt_groups(keys, prompts, responses, token_budget=25)
    assert tight.batches[:2] == [[0, 4], [2]] and tight.shared[:2] == [True, False]
