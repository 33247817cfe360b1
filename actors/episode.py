"""One multi-turn search episode, token in and token out (spec section 1).

The loop, as in the paper: generate until ``</search>`` or ``</answer>``; on a search, call the engine and append the
``<information>`` block; on an answer, stop; on anything else, append the invalid-action message. After ``max_turns``
searches the policy gets one last generation, whose search (if any) is not executed, and the episode ends.

History is never re-tokenized: sampled token ids are kept exactly as the engine produced them, observation tokens are
appended after them, and ``loss_mask`` records which is which. The original decoded, cut and re-tokenized each turn,
which can change tokens and loses the engine's logprobs.

Two edges, decided here:
- A turn that ends at EOS but is followed by an observation (an invalid action before the last turn) loses its EOS:
  kept, the next turn would be conditioned on an end of turn in mid-trajectory and the EOS trained with mask 1 as if
  it had ended the episode. The original lost it too, by decoding with ``skip_special_tokens``.
- A generation that times out (``RolloutConfig.generate_timeout_s``) ends that episode only, with finish reason
  ``error``: it keeps what it had, every token gets loss mask 0 (it trains nothing, though its reward, usually 0,
  still counts in its group's baseline), and it is counted in ``episode/errors``.

The engine that generates is passed in as a function, so this core runs without vLLM in unit tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from actors.protocol import INVALID_ACTION_MESSAGE, STOP_STRINGS, observation_token_ids, parse_action
from actors.reward import even_token_share, score_response
from actors.trajectory import EpisodeStats
from simulator.base import SearchContext, SearchEngine


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # stop (stop string or EOS) | length


# (context ids, token budget) -> the sampled turn, stopped at the protocol's closing tags. The lever ``open_search``
# also calls it with ``stop=``, other stop strings.
GenerateFn = Callable[..., Awaitable[Generation]]

# The exploration lever ``open_search``: the environment writes this after the policy's ``</think>``.
OPENED_SEARCH = "\n<search>"
THINK_CLOSE = "</think>"


@dataclass
class EpisodeConfig:
    """Per-episode limits.

    Attributes:
        max_turns: searches allowed; the policy generates at most ``max_turns + 1`` times (paper: 2).
        max_tokens_per_turn: new tokens per generation (paper: 500).
        max_response_tokens: all response tokens, model and observation, of one episode.
        max_obs_tokens: tokens of one ``<information>`` block, closing tag kept.

    Documents per search are the search engine's (``search.top_k``): one key, for training and every other command.
        reward_metric: ``f1`` (the paper's training reward), ``exact_match`` or ``substring_match``; or the probe
            ``even_token_share`` (``actors.reward``), which checks that learning works at all.
        open_search: an exploration lever, set per episode by the rollout (``RolloutConfig.open_search_share``). In
            every turn after an ``<information>`` but the last, the policy writes its thought up to ``</think>``, the
            environment writes ``OPENED_SEARCH`` (loss mask 0, like an observation), and the policy writes the query
            and goes on. A turn that acts before it closes its thought is left as it was.
        train_opened_tag: train the opened tag as the policy's own tokens (loss mask 1), so that the choice to search
            again is learned from the opened episodes themselves (``RolloutConfig.open_search_trains_tag``). Their
            behaviour logprob is 0.0: the environment wrote them with probability 1, so an importance ratio against
            it (TIS, or the engine's logprobs as π_old) is π_θ(tag), the ratio of an action the sampler forced.
    """

    max_turns: int = 2
    max_tokens_per_turn: int = 500
    max_response_tokens: int = 2048
    max_obs_tokens: int = 512
    reward_metric: str = "f1"
    open_search: bool = False
    train_opened_tag: bool = False


@dataclass
class EpisodeResult:
    response_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    response_text: str
    reward: float
    stats: EpisodeStats


async def run_episode(
    prompt_ids: list[int],
    question: str,
    golden_answers: tuple[str, ...],
    generate: GenerateFn,
    engine: SearchEngine,
    tokenizer: Any,
    cfg: EpisodeConfig,
    noise_prob: float = 0.0,
    seed: int | None = None,
) -> EpisodeResult:
    response_ids: list[int] = []
    loss_mask: list[int] = []
    logprobs: list[float] = []
    stats = EpisodeStats()
    eos_id = getattr(tokenizer, "eos_token_id", None)

    def append(ids: list[int], mask: int, lps: list[float] | None = None) -> None:
        response_ids.extend(ids)
        loss_mask.extend([mask] * len(ids))
        logprobs.extend(lps if lps is not None else [0.0] * len(ids))

    for turn in range(cfg.max_turns + 1):
        budget = min(cfg.max_tokens_per_turn, cfg.max_response_tokens - len(response_ids))
        if budget <= 0:
            stats.finish_reason = "length"
            break
        started = time.perf_counter()
        opens = cfg.open_search and 0 < turn < cfg.max_turns and stats.searches == turn
        try:
            if opens:
                thought, opened, generation = await _opened_turn(prompt_ids + response_ids, budget, generate,
                                                                 tokenizer)
            else:
                thought, opened, generation = None, [], await generate(prompt_ids + response_ids, budget)
        except (TimeoutError, asyncio.TimeoutError):  # one slow episode must not end the step
            stats.generation_s += time.perf_counter() - started
            stats.finish_reason = "error"
            stats.error = f"generation of turn {turn + 1} timed out"
            break
        stats.generation_s += time.perf_counter() - started
        stats.turns += 1
        if thought is not None:  # the policy's thought, the environment's tag; the policy's query follows
            append(thought.token_ids, 1, thought.logprobs)
            append(opened, int(cfg.train_opened_tag))  # logprob 0.0 either way: written with probability 1
            stats.opened_searches += 1
            stats.generated_tokens += len(thought.token_ids)
        stats.generated_tokens += len(generation.token_ids)
        turn_text = tokenizer.decode((thought.token_ids + opened if thought is not None else []) + generation.token_ids,
                                     skip_special_tokens=True)

        action = parse_action(turn_text)
        if action.kind == "invalid":
            stats.invalid_actions += 1
        else:
            stats.valid_actions += 1
        ids, lps = generation.token_ids, generation.logprobs
        if action.kind != "answer" and turn < cfg.max_turns and ids and ids[-1] == eos_id:
            ids, lps = ids[:-1], lps[:-1]  # an observation follows: no end of turn inside the trajectory
        append(ids, 1, lps)
        if action.kind == "answer":
            stats.answered = True
            stats.finish_reason = "answer"
            break
        if turn == cfg.max_turns:
            # The last generation's search would be executed and thrown away (spec): skipping it changes nothing.
            stats.finish_reason = "max_turns"
            break
        if action.kind == "search":
            ctx = SearchContext(question=question, golden_answers=golden_answers, noise_prob=noise_prob,
                                seed=None if seed is None else seed * 1000 + turn)
            started = time.perf_counter()
            result = await engine.search(action.content, ctx)
            stats.search_s += time.perf_counter() - started
            stats.searches += 1
            stats.queries.append(action.content)
            stats.documents.append(list(result.documents))
            stats.noisy.append(result.meta.noisy)
            stats.failed_searches += int(result.meta.failed)
            observation = observation_token_ids(result.text, tokenizer, cfg.max_obs_tokens)
        else:
            observation = tokenizer.encode(INVALID_ACTION_MESSAGE, add_special_tokens=False)
        stats.observation_tokens += len(observation)
        append(observation, 0)
        if len(response_ids) >= cfg.max_response_tokens:
            stats.finish_reason = "length"
            break

    if stats.finish_reason == "error":
        loss_mask[:] = [0] * len(loss_mask)
        if not response_ids:  # the learner needs one response token; an end of turn it is not trained on
            append([eos_id if eos_id is not None else 0], 0)
    response_text = tokenizer.decode(response_ids, skip_special_tokens=True)
    if cfg.reward_metric == "even_token_share":
        reward = even_token_share(response_ids, loss_mask)
    else:
        reward = score_response(response_text, golden_answers, cfg.reward_metric)
    return EpisodeResult(response_ids, loss_mask, logprobs, response_text, reward, stats)


async def _opened_turn(context: list[int], budget: int, generate: GenerateFn,
                       tokenizer: Any) -> tuple[Generation | None, list[int], Generation]:
    """A turn opened for a search: the policy's thought, stopped at ``</think>``; the ids of the tag the environment
    writes after it; and the policy's continuation from there. A turn that acted, ran out of budget or ended before
    closing its thought is returned whole, as the continuation, with nothing opened."""
    thought = await generate(context, budget, stop=(THINK_CLOSE, *STOP_STRINGS))
    text = tokenizer.decode(thought.token_ids, skip_special_tokens=True)
    if thought.finish_reason != "stop" or not text.rstrip().endswith(THINK_CLOSE):
        return None, [], thought
    opened = tokenizer.encode(OPENED_SEARCH, add_special_tokens=False)
    left = budget - len(thought.token_ids) - len(opened)
    rest = await generate(context + thought.token_ids + opened, left) if left > 0 else Generation([], [], "length")
    return thought, opened, rest
