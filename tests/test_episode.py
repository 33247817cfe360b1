"""The episode loop (``actors/episode.py``) with a scripted generator and engine: the edges of a trajectory.

A fake generator is fine here: this is a unit test of the loop above the engine; real episodes are covered end to end.
"""

from __future__ import annotations

import asyncio

import pytest

from actors.episode import EpisodeConfig, Generation, run_episode
from actors.protocol import INVALID_ACTION_MESSAGE
from simulator.base import SearchEngine, SearchMeta, SearchResult

EOS = 0  # token 0 is the tokenizer's end of turn; every other id is a character


class EosCharTokenizer:
    """One token per character; id 0 is EOS, which decoding with ``skip_special_tokens`` leaves out."""

    eos_token_id = EOS

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join("<eos>" if i == EOS else chr(i) for i in ids if not (skip_special_tokens and i == EOS))


class Docs(SearchEngine):
    async def search(self, query, ctx):
        return SearchResult(["Tavo Merin works for Rerza Foundry."], SearchMeta(engine="fake"))


def scripted(*turns: str | float):
    """A generator that answers each call with the next turn: text (then EOS if it ends in "|"), or a number of
    seconds to sleep past any timeout."""
    queue = list(turns)

    async def generate(context, budget):
        turn = queue.pop(0)
        if isinstance(turn, float):
            await asyncio.sleep(turn)
        text, eos = (turn[:-1], True) if turn.endswith("|") else (turn, False)
        ids = [ord(c) for c in text] + ([EOS] if eos else [])
        return Generation(ids, [-0.5] * len(ids), "stop")

    return generate


def run(generate, **cfg):
    config = EpisodeConfig(max_turns=2, max_tokens_per_turn=200, max_response_tokens=4000, max_obs_tokens=400, **cfg)
    return asyncio.run(run_episode([1, 2, 3], "Who employs Tavo Merin?", ("Rerza Foundry",), generate, Docs(),
                                   EosCharTokenizer(), config))


def test_an_invalid_turn_that_ends_at_eos_loses_its_eos_before_the_message():
    result = run(scripted("I am not sure.|", "<search> Tavo Merin </search>", "<answer> Rerza Foundry </answer>|"))
    ids, mask = result.response_ids, result.loss_mask
    first = [ord(c) for c in "I am not sure."]
    message = [ord(c) for c in INVALID_ACTION_MESSAGE]
    # The first turn's text, straight into the invalid-action message: no EOS between them, with mask 1 or any.
    assert ids[: len(first) + len(message)] == first + message
    assert mask[: len(first)] == [1] * len(first) and mask[len(first): len(first) + len(message)] == [0] * len(message)
    # The only EOS is the one that ends the episode, after the answer, and it is trained (mask 1).
    assert [i for i, t in enumerate(ids) if t == EOS] == [len(ids) - 1] and mask[-1] == 1
    assert len(result.logprobs) == len(ids) and result.reward == 1.0
    assert result.stats.finish_reason == "answer" and result.stats.invalid_actions == 1


def test_the_last_turn_keeps_its_eos():
    result = run(scripted("hmm|", "still unsure|", "no idea|"), )
    # Turns 1 and 2 are followed by the message and lose their EOS; turn 3 ends the episode and keeps it.
    assert result.response_ids.count(EOS) == 1 and result.response_ids[-1] == EOS and result.loss_mask[-1] == 1
    assert result.stats.finish_reason == "max_turns" and result.stats.invalid_actions == 3


def test_a_generation_timeout_ends_that_episode_with_mask_zero():
    async def with_timeout(context, budget, inner=scripted("<search> Tavo Merin </search>", 5.0)):
        return await asyncio.wait_for(inner(context, budget), timeout=0.05)

    result = run(with_timeout)
    assert result.stats.finish_reason == "error" and "turn 2" in result.stats.error
    assert result.stats.searches == 1 and result.stats.turns == 1
    assert result.response_ids and set(result.loss_mask) == {0}  # what it had, trained on nothing
    assert result.reward == 0.0


def test_a_timeout_on_the_first_turn_leaves_one_untrained_token():
    async def slow(context, budget):
        return await asyncio.wait_for(asyncio.sleep(5.0), timeout=0.05)

    result = run(slow)
    assert (result.response_ids, result.loss_mask, result.logprobs) == ([EOS], [0], [0.0])
    assert result.stats.finish_reason == "error" and result.stats.turns == 0


def test_other_generation_errors_still_raise():
    async def broken(context, budget):
        raise RuntimeError("engine died")

    with pytest.raises(RuntimeError, match="engine died"):
        run(broken)


def opening_scripted(*turns: str):
    """Like ``scripted``, but honours ``stop=``: a turn is cut just after the first stop string it holds, and what it
    held after it is dropped (after the environment's tag, the policy samples anew: the next scripted turn)."""
    queue = list(turns)
    calls = []

    async def generate(context, budget, stop=None):
        calls.append(stop)
        text = queue.pop(0)
        if stop:
            cuts = [text.index(s) + len(s) for s in stop if s in text]
            if cuts:
                text = text[:min(cuts)]
        ids = [ord(c) for c in text][:budget]
        return Generation(ids, [-0.5] * len(ids), "stop" if len(ids) < budget or not stop else "length")

    generate.calls = calls
    return generate


def _spans_of(result, value):
    text, runs, current = result.response_ids, [], []
    for token, mask in zip(text, result.loss_mask):
        if mask == value:
            current.append(chr(token))
        elif current:
            runs.append("".join(current))
            current = []
    return runs + (["".join(current)] if current else [])


def test_an_opened_turn_writes_the_search_tag_after_the_thought_with_mask_zero():
    generate = opening_scripted("<think> who? </think>\n<search> Tavo Merin </search>",
                                "<think> I read Rerza. </think>\n<answer> Rerza Foundry </answer>",  # cut at </think>
                                " Rerza Foundry </search>",
                                "<think> found </think>\n<answer> Rerza Foundry </answer>|")
    result = run(generate, open_search=True)
    # Turn 2: the policy's thought (mask 1), the environment's tag (mask 0), then the policy's query (mask 1); the
    # answer it would have written after its thought was never sampled.
    assert "".join(chr(t) for t in result.response_ids).count("<search>") == 2
    masked = _spans_of(result, 0)
    assert masked[1] == "\n<search>" and masked[0].startswith("\n\n<information>")
    trained = _spans_of(result, 1)
    assert trained[1] == "<think> I read Rerza. </think>" and trained[2] == " Rerza Foundry </search>"
    assert result.stats.searches == 2 and result.stats.opened_searches == 1
    assert result.stats.queries == ["Tavo Merin", "Rerza Foundry"] and result.stats.turns == 3
    assert all(lp == 0.0 for lp, m in zip(result.logprobs, result.loss_mask) if m == 0)
    # Only turn 2 was opened: the first and the last turn are sampled with the protocol's stop strings.
    assert [c is not None and "</think>" in c for c in generate.calls] == [False, True, False, False]
    assert result.reward == 1.0 and result.stats.finish_reason == "answer"


def test_a_trained_opened_tag_has_mask_one_and_the_behaviour_logprob_of_a_forced_token():
    turns = ("<think> who? </think>\n<search> Tavo Merin </search>", "<think> I read Rerza. </think>\n<answer> x",
             " Rerza Foundry </search>", "<think> found </think>\n<answer> Rerza Foundry </answer>|")
    untrained = run(opening_scripted(*turns), open_search=True)
    trained = run(opening_scripted(*turns), open_search=True, train_opened_tag=True)
    assert trained.response_ids == untrained.response_ids and trained.reward == untrained.reward == 1.0
    tag = [ord(c) for c in "\n<search>"]
    # The opened tag is the one that was masked without the flag (the first turn's tag was the policy's own).
    start = next(i for i in range(len(trained.response_ids)) if trained.response_ids[i:i + len(tag)] == tag
                 and untrained.loss_mask[i:i + len(tag)] == [0] * len(tag))
    span = range(start, start + len(tag))
    # The tag alone changes: mask 0 -> 1, and its logprob stays 0.0 (the environment wrote it with probability 1).
    assert [trained.loss_mask[i] for i in span] == [1] * len(tag)
    assert [trained.logprobs[i] for i in span] == [0.0] * len(tag)
    others = [i for i in range(len(trained.loss_mask)) if i not in span]
    assert [trained.loss_mask[i] for i in others] == [untrained.loss_mask[i] for i in others]
    # The observations stay masked.
    assert _spans_of(trained, 0)[0].startswith("\n\n<information>")


def test_a_turn_that_acts_before_closing_its_thought_is_not_opened():
    generate = opening_scripted("<search> Tavo Merin </search>", "<answer> Rerza Foundry </answer>|")
    result = run(generate, open_search=True)
    assert result.stats.opened_searches == 0 and result.stats.searches == 1 and result.stats.answered
    assert _spans_of(result, 0) == [_spans_of(result, 0)[0]]  # one masked span: the observation
    assert result.reward == 1.0


def test_the_last_turn_and_the_closed_lever_are_never_opened():
    first, last = "<think> a </think>\n<search> Tavo Merin </search>", "<think> c </think>\n<answer> Rerza </answer>|"
    closed = run(opening_scripted(first, "<think> b </think>\n<search> Rerza </search>", last))
    assert closed.stats.opened_searches == 0 and closed.stats.searches == 2
    generate = opening_scripted(first, "<think> b </think>", " Rerza </search>", last)
    opened = run(generate, open_search=True)
    # Turn 2 was opened, turn 3 was not: with max_turns 2 its search would never be run.
    assert opened.stats.opened_searches == 1 and opened.stats.searches == 2 and opened.stats.answered
    assert opened.stats.queries == closed.stats.queries == ["Tavo Merin", "Rerza"]
    assert sum(1 for c in generate.calls if c) == 1
