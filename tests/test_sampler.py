"""The prompt sampler (``launch/driver/sampler.py``): seeded epochs, resumable, and optionally stratified by source."""

from __future__ import annotations

import pytest

from actors.dataset import QAExample
from launch.driver.sampler import PromptSampler, spread_sources


def _mixed(single: int, multi: int) -> list[QAExample]:
    """``single`` one-hop questions first, then ``multi`` two-hop ones: the order a generator writes them in."""
    return [QAExample(uid=f"q{i}", question=f"question {i}", golden_answers=("a",),
                      data_source="1hop" if i < single else "2hop") for i in range(single + multi)]


def _two_hop_counts(draws: list[QAExample], window: int) -> list[int]:
    return [sum(e.data_source == "2hop" for e in draws[i:i + window]) for i in range(len(draws) - window + 1)]


def test_spread_sources_without_jitter_interleaves_by_hand():
    # sources a a a b (shares 3/4 and 1/4): keys a 1/6 1/2 5/6, b 1/2; the sort is stable on the key then the index
    assert spread_sources([0, 1, 2, 3], ["a", "a", "a", "b"], rng=None) == [0, 1, 3, 2]


def test_a_stratified_epoch_is_a_permutation_with_every_window_near_the_sources_shares():
    examples = _mixed(60, 40)
    sampler = PromptSampler(examples, seed=3, stratify=True)
    for _ in range(3):  # three epochs, each its own permutation
        draws = sampler.next(100)
        assert sorted(e.uid for e in draws) == sorted(e.uid for e in examples)
        counts = _two_hop_counts(draws, window=10)
        assert min(counts) >= 2 and max(counts) <= 6, counts  # 4 expected in every 10 draws


def test_a_plain_shuffle_does_not_hold_the_shares_which_is_why_stratify_exists():
    # the same set and seeds: some window of 10 plain draws strays further than any stratified one does
    worst = max(max(abs(c - 4) for c in _two_hop_counts(PromptSampler(_mixed(60, 40), seed=s).next(100), 10))
                for s in range(5))
    assert worst >= 3


def test_a_stratified_sampler_resumes_where_it_stopped_and_refuses_a_plain_state():
    examples = _mixed(30, 20)
    first = PromptSampler(examples, seed=1, stratify=True)
    first.next(37)
    state = first.state_dict()
    resumed = PromptSampler(examples, seed=1, stratify=True)
    resumed.load_state_dict(state)
    assert [e.uid for e in resumed.next(40)] == [e.uid for e in first.next(40)]
    with pytest.raises(ValueError, match="data.stratify=True"):
        PromptSampler(examples, seed=1).load_state_dict(state)


def test_an_old_state_without_the_stratify_key_loads_into_a_plain_sampler():
    sampler = PromptSampler(_mixed(5, 5), seed=0)
    sampler.load_state_dict({"epoch": 2, "position": 3, "seed": 0, "size": 10})
    assert (sampler.epoch, sampler.position) == (2, 3)
