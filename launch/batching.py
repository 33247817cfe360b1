"""From trajectories to learner samples: the driver's one piece of algorithm glue.

``actors`` and ``learners`` never import each other; this is where a finished group of episodes becomes advantages
and ``LearnerSample`` records. Pure and tested without Ray.
"""

from __future__ import annotations

import statistics

import torch

from actors.rollout import EpisodeRequest
from actors.trajectory import Trajectory
from learners import algorithms as A
from learners.batch import LearnerSample
from learners.engine import pad_rows

ALGORITHMS = A.ALGORITHMS


def episode_requests(prompts: list, seed: int, step: int, first_index: int = 0) -> list[EpisodeRequest]:
    """One request per drawn prompt, each with its own group id and seed.

    A group id names one draw, not one question: when the sampler wraps an epoch inside a step the same question can
    be drawn twice, and keyed by its uid the two groups would merge into one group of 2G. ``first_index`` numbers
    the prompts of a refill round after those of the step's earlier rounds."""
    return [EpisodeRequest(f"{p.uid}@{step}.{first_index + i}", p.question, p.golden_answers, p.data_source,
                           seed=seed * 1_000_003 + step * 1000 + first_index + i) for i, p in enumerate(prompts)]


def learner_samples(trajectories: list[Trajectory]) -> list[LearnerSample]:
    """Learner records carrying the engine's logprobs as ``rollout_logprobs``. Where the PPO ratio's old logprobs come
    from is the driver's choice (``launch.train.old_logprobs_source``). Advantages come later, from
    ``assign_advantages``, once values and reference logprobs exist."""
    samples = []
    for t in trajectories:
        sample = LearnerSample(input_ids=t.prompt_ids + t.response_ids, prompt_len=len(t.prompt_ids),
                               loss_mask=list(t.loss_mask), rollout_logprobs=list(t.rollout_logprobs),
                               policy_version=t.policy_version)
        sample.validate()
        samples.append(sample)
    return samples


def assign_advantages(samples: list[LearnerSample], trajectories: list[Trajectory], algorithm: str,
                      kl_in_reward_coef: float = 0.0, gamma: float = 1.0, lam: float = 1.0) -> dict[str, float]:
    """Fill each sample's ``advantages`` (and, for PPO, ``returns``) from the group's rewards. PPO reads the critic's
    values from ``old_values``; a KL in the reward reads ``old_logprobs`` and ``ref_logprobs``. Returns metrics."""
    width = max(s.response_len for s in samples)
    mask = pad_rows([s.loss_mask for s in samples], width)
    optional = {name: pad_rows([getattr(s, field) for s in samples], width) if getattr(samples[0], field) else None
                for name, field in (("values", "old_values"), ("old_logp", "old_logprobs"),
                                    ("ref_logp", "ref_logprobs"))}
    result = A.compute_advantages(algorithm, torch.tensor([t.reward for t in trajectories], dtype=torch.float32),
                                  [t.group_id for t in trajectories], mask, kl_in_reward_coef=kl_in_reward_coef,
                                  gamma=gamma, lam=lam, **optional)
    for i, s in enumerate(samples):
        s.advantages = result.advantages[i, : s.response_len].tolist()
        if result.returns is not None:
            s.returns = result.returns[i, : s.response_len].tolist()
    metrics = {"critic/advantages/mean": A.masked_mean(result.advantages, mask).item(),
               "critic/advantages/max": result.advantages[mask.bool()].max().item() if mask.any() else 0.0}
    if kl_in_reward_coef:
        metrics["critic/reward_kl"] = result.reward_kl
    return metrics


def rollout_metrics(trajectories: list[Trajectory]) -> dict[str, float]:
    """The field's metric names (DESIGN section 7) over one step's episodes."""
    def mean(values) -> float:
        values = list(values)
        return float(statistics.fmean(values)) if values else 0.0

    turns = sum(t.stats.turns for t in trajectories)
    searches = [s for t in trajectories for s in t.stats.noisy]
    # Reward per data source: on the synthetic world, single-hop and two-hop questions apart.
    sources = sorted({t.data_source for t in trajectories})
    by_source = {f"critic/score/{source}": mean(t.reward for t in trajectories if t.data_source == source)
                 for source in sources}
    # Searches per episode per source: on two-hop questions a second search is the skill RL should teach.
    by_source.update({f"search/calls_per_episode/{source}": mean(t.stats.searches for t in trajectories
                                                                 if t.data_source == source) for source in sources})
    return {
        **by_source,
        **answer_in_first_results(trajectories),
        "critic/score/mean": mean(t.reward for t in trajectories),
        "critic/score/max": max(t.reward for t in trajectories),
        "response_length/mean": mean(len(t.response_ids) for t in trajectories),
        "response_length/generated_mean": mean(t.stats.generated_tokens for t in trajectories),
        "search/calls_per_episode": mean(t.stats.searches for t in trajectories),
        "search/noisy_share": mean(1.0 if s else 0.0 for s in searches) if searches else 0.0,
        "search/failed": float(sum(t.stats.failed_searches for t in trajectories)),
        "episode/valid_action_share": sum(t.stats.valid_actions for t in trajectories) / max(turns, 1),
        "episode/answered_share": mean(1.0 if t.stats.answered else 0.0 for t in trajectories),
        "episode/turns_mean": mean(t.stats.turns for t in trajectories),
        "episode/errors": float(sum(t.stats.finish_reason == "error" for t in trajectories)),
    }


def answer_in_first_results(trajectories: list[Trajectory]) -> dict[str, float]:
    """Per data source, the share of first searches whose documents already contain a gold answer, and the same
    for the simulator's useful and noisy draws apart. On two-hop questions a real engine almost never does this
    (the answer is one hop further); a simulator that was shown the answer may write it in, and a policy trained on
    that learns a one-search shortcut that fails against a real engine."""
    from actors.reward import substring_match

    hits: dict[str, list[float]] = {}
    for t in trajectories:
        if not t.stats.documents:
            continue
        found = float(substring_match("\n".join(t.stats.documents[0]), tuple(t.golden_answers)))
        hits.setdefault(f"search/answer_in_first_results/{t.data_source}", []).append(found)
        noisy = t.stats.noisy[0] if t.stats.noisy else None
        if noisy is not None:
            draw = "noisy" if noisy else "useful"
            hits.setdefault(f"search/answer_in_first_results/{t.data_source}/{draw}", []).append(found)
    return {key: statistics.fmean(values) for key, values in sorted(hits.items())}
