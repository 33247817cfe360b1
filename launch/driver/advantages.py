"""From trajectories to learner samples and their advantages: the driver's one piece of algorithm glue.

``actors`` and ``learners`` never import each other; this is where a finished group of episodes becomes advantages
and ``LearnerSample`` records. Pure and tested without Ray.
"""

from __future__ import annotations

import torch

from actors.trajectory import Trajectory
from learners import algorithms as A
from learners.batch import LearnerSample
from learners.forward import pad_rows


def learner_samples(trajectories: list[Trajectory]) -> list[LearnerSample]:
    """Learner records carrying the engine's logprobs as ``rollout_logprobs``. Where the PPO ratio's old logprobs come
    from is the driver's choice (``launch.driver.cluster.old_logprobs_source``). Advantages come later, from
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
