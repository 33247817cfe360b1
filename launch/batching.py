"""From trajectories to learner samples: the driver's one piece of algorithm glue.

``actors`` and ``learners`` never import each other; this is where a finished group of episodes becomes advantages
and ``LearnerSample`` records. Pure and tested without Ray.
"""

from __future__ import annotations

import statistics

import torch

from actors.trajectory import Trajectory
from learners import algorithms as A
from learners.batch import LearnerSample

SEQUENCE_ESTIMATORS = {
    "grpo": lambda scores, groups: A.grpo_advantages(scores, groups),
    "dr_grpo": lambda scores, groups: A.dr_grpo_advantages(scores, groups),
    "rloo": lambda scores, groups: A.rloo_advantages(scores, groups),
    "reinforce": lambda scores, groups: A.reinforce_advantages(scores),
}
TOKEN_ESTIMATORS = ("reinforce_pp", "reinforce_pp_baseline")
ALGORITHMS = tuple(SEQUENCE_ESTIMATORS) + TOKEN_ESTIMATORS


def token_advantages(trajectories: list[Trajectory], algorithm: str) -> list[list[float]]:
    """Per response token advantages, zero on observation tokens."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {list(ALGORITHMS)}")
    width = max(len(t.response_ids) for t in trajectories)
    mask = torch.zeros(len(trajectories), width)
    for i, t in enumerate(trajectories):
        mask[i, : len(t.loss_mask)] = torch.tensor(t.loss_mask, dtype=torch.float32)
    scores = torch.tensor([t.reward for t in trajectories], dtype=torch.float32)
    groups = [t.group_id for t in trajectories]
    if algorithm in SEQUENCE_ESTIMATORS:
        advantages = A.broadcast_to_tokens(SEQUENCE_ESTIMATORS[algorithm](scores, groups), mask)
    elif algorithm == "reinforce_pp":
        advantages = A.reinforce_pp_advantages(A.place_sequence_reward(scores, mask), mask)
    else:
        advantages = A.reinforce_pp_baseline_advantages(scores, groups, mask)
    return [advantages[i, : len(t.response_ids)].tolist() for i, t in enumerate(trajectories)]


def learner_samples(trajectories: list[Trajectory], algorithm: str) -> list[LearnerSample]:
    """Learner records carrying the rollout logprobs as the behaviour policy: with one PPO epoch on fresh weights the
    ratio is then the engine-vs-learner mismatch, which the clip keeps bounded."""
    samples = []
    for t, adv in zip(trajectories, token_advantages(trajectories, algorithm)):
        sample = LearnerSample(input_ids=t.prompt_ids + t.response_ids, prompt_len=len(t.prompt_ids),
                               loss_mask=list(t.loss_mask), advantages=adv, old_logprobs=list(t.rollout_logprobs),
                               policy_version=t.policy_version)
        sample.validate()
        samples.append(sample)
    return samples


def rollout_metrics(trajectories: list[Trajectory]) -> dict[str, float]:
    """The field's metric names (DESIGN section 7) over one step's episodes."""
    def mean(values) -> float:
        values = list(values)
        return float(statistics.fmean(values)) if values else 0.0

    turns = sum(t.stats.turns for t in trajectories)
    searches = [s for t in trajectories for s in t.stats.noisy]
    return {
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
    }
