"""``RolloutCore`` without a vLLM engine: the episode's prompt and turns, over a real BM25 engine and tokenizer, with
the one call to vLLM (``generate``) replaced by a scripted policy. The engine side is tested end to end in
``tests/test_train_e2e.py``."""

from __future__ import annotations

import asyncio

import pandas as pd
import pytest

from actors.episode import EpisodeConfig, Generation
from actors.rollout import EpisodeRequest, RolloutConfig, RolloutCore
from simulator.engines import BM25Search


def _scripted_core(cfg: RolloutConfig, tokenizer, corpus: str, reply: str) -> tuple[RolloutCore, list[list[int]]]:
    """A core whose policy writes ``reply`` every turn; it records the context of every generation."""
    core = RolloutCore.__new__(RolloutCore)
    core.cfg, core.tokenizer, core.search_engine, core.policy_version = cfg, tokenizer, BM25Search(corpus), 0
    contexts: list[list[int]] = []

    async def generate(context_ids, max_tokens, guided_regex=None, temperature=None, stop=None) -> Generation:
        contexts.append(list(context_ids))
        ids = tokenizer.encode(reply, add_special_tokens=False)
        return Generation(ids, [-0.5] * len(ids), "stop")

    core.generate = generate
    return core, contexts


def test_rag_prompt_carries_one_searchs_documents_and_the_episode_is_one_turn(tokenizer, synthetic_world):
    row = pd.read_parquet(synthetic_world["train"]).iloc[0]
    question, gold = row["question"], tuple(row["golden_answers"])
    request = EpisodeRequest("g0", question, gold, "synthetic", seed=1)
    documents = asyncio.run(BM25Search(str(synthetic_world["corpus"])).search(question)).text
    cfg = RolloutConfig(prompt="rag", episode=EpisodeConfig(max_turns=2, max_tokens_per_turn=32))
    # A policy that asks to search again: in the RAG setting there is no second turn to search in.
    core, contexts = _scripted_core(cfg, tokenizer, str(synthetic_world["corpus"]), "<search> more </search>")
    trajectory = asyncio.run(core.run(request, noise_prob=0.0))
    assert len(contexts) == 1 and trajectory.stats.searches == 0 and trajectory.reward == 0.0
    prompt = tokenizer.decode(trajectory.prompt_ids)
    assert "Answer the given question using the documents below" in prompt and f"Question: {question}" in prompt
    assert documents.strip() in prompt and all(m == 1 for m in trajectory.loss_mask)  # no <information> in the response

    core, contexts = _scripted_core(cfg, tokenizer, str(synthetic_world["corpus"]), f"<answer> {gold[0]} </answer>")
    assert asyncio.run(core.run(request, noise_prob=0.0)).reward == 1.0

    agent, contexts = _scripted_core(RolloutConfig(episode=EpisodeConfig(max_turns=2, max_tokens_per_turn=32)),
                                     tokenizer, str(synthetic_world["corpus"]), "<search> more </search>")
    trajectory = asyncio.run(agent.run(request, noise_prob=0.0))
    assert len(contexts) == 3 and trajectory.stats.searches == 2  # the paper's prompt: search, search, then no more
    assert "Documents:" not in tokenizer.decode(trajectory.prompt_ids)


def test_open_search_opens_a_fixed_share_of_sampled_episodes_and_no_greedy_one():
    from actors.rollout import RolloutConfig, opens_search

    draws = [opens_search(0.25, seed, None) for seed in range(2000)]
    assert 0.22 < sum(draws) / len(draws) < 0.28
    assert draws == [opens_search(0.25, seed, 1.0) for seed in range(2000)]  # a rerun opens the same episodes
    assert not any(opens_search(0.25, seed, 0.0) for seed in range(2000))  # validation and evaluation are greedy
    assert not any(opens_search(0.0, seed, None) for seed in range(2000)) and all(
        opens_search(1.0, seed, None) for seed in range(200))
    with pytest.raises(ValueError, match=r"rollout.open_search_share=1.5: expected a share between 0 and 1"):
        RolloutConfig(open_search_share=1.5)
    with pytest.raises(ValueError, match=r"open_search_trains_tag=true with rollout.open_search_share=0"):
        RolloutConfig(open_search_trains_tag=True)
    assert RolloutConfig(open_search_share=0.5, open_search_trains_tag=True).open_search_trains_tag


def test_the_open_search_share_anneals_linearly_to_its_end_and_each_step_uses_its_own(tokenizer, synthetic_world):
    from actors.rollout import open_search_share_at
    from launch.driver.sampler import episode_requests

    cfg = RolloutConfig(open_search_share=0.5, open_search_share_end=0.0, open_search_trains_tag=True)
    # 21 steps: 0.5 at step 1, 0.25 at step 11, 0 at step 21; without an end the share stays where it is.
    assert [open_search_share_at(cfg, step, 21) for step in (1, 11, 21)] == pytest.approx([0.5, 0.25, 0.0])
    assert open_search_share_at(RolloutConfig(open_search_share=0.5), 21, 21) == 0.5
    assert open_search_share_at(cfg, 1, 1) == 0.5  # a one-step run has only its first step
    with pytest.raises(ValueError, match=r"rollout.open_search_share_end=1.5: expected a share between 0 and 1"):
        RolloutConfig(open_search_share=0.5, open_search_share_end=1.5)

    # The step's share, carried by its requests, decides over the rollout's own: at 0 no episode is opened.
    row = pd.read_parquet(synthetic_world["train"]).iloc[0]
    prompt = type("Prompt", (), {"uid": "u0", "question": row["question"], "data_source": "synthetic_1hop",
                                 "golden_answers": tuple(row["golden_answers"])})()
    episode = EpisodeConfig(max_turns=2, max_tokens_per_turn=32)
    core, _ = _scripted_core(RolloutConfig(open_search_share=1.0, episode=episode), tokenizer,
                             str(synthetic_world["corpus"]), "<think> more </think> <search> more </search>")
    scripted = core.generate

    async def generate(context_ids, max_tokens, guided_regex=None, temperature=None, stop=None) -> Generation:
        if stop and "</think>" in stop:  # an opened turn's thought stops where the environment writes the tag
            ids = tokenizer.encode("<think> more </think>", add_special_tokens=False)
            return Generation(ids, [-0.5] * len(ids), "stop")
        return await scripted(context_ids, max_tokens, guided_regex, temperature, stop)

    core.generate = generate
    for share, opened in ((None, 1), (0.0, 0), (1.0, 1)):
        [request] = episode_requests([prompt], seed=0, step=1, open_search_share=share)
        assert asyncio.run(core.run(request, noise_prob=0.0)).stats.opened_searches == opened, share


def test_the_engine_gap_leaves_out_trained_tokens_the_engine_did_not_sample():
    from launch.driver.cluster import masked_gap
    from learners.batch import LearnerSample

    sample = LearnerSample(input_ids=[9, 1, 2, 3, 4, 5], prompt_len=1, loss_mask=[1, 1, 0, 1, 1],
                           rollout_logprobs=[-1.0, 0.0, 0.0, -2.0, -0.5])
    sample.old_logprobs = [-1.5, -9.0, -7.0, -2.0, -0.25]
    # Sampled model tokens only: |−1 − (−1.5)|, |−2 − (−2)|, |−0.5 − (−0.25)|; the forced tag (0.0, mask 1) and the
    # observation (mask 0) are out.
    assert masked_gap([sample]) == pytest.approx((0.5 + 0.0 + 0.25) / 3)
