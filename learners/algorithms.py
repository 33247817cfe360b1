"""The RL maths of ZeroSearch: masked statistics, rewards, advantage estimators and KL estimators.

The per-token losses that use them are in ``learners/losses.py``.

Pure torch, no Ray or DeepSpeed, so every function here can be checked by hand on a few numbers.

Conventions
-----------
* Tensors are ``[batch, response_len]`` (``[B, T]``); logits are ``[B, T, V]``.
* ``loss_mask`` is 1 on tokens the policy sampled and 0 on observation tokens (the ``<information>`` blocks and the
  invalid-action message) and on padding. Observations can sit in the middle of a response: model tokens, an
  observation gap, then model tokens again.
* A sequence-level scalar reward sits on the last token whose ``loss_mask`` is 1.
* Everything that is a statistic over tokens (means, variances, whitening, GAE, returns) looks at model tokens only.
  The original used ``attention_mask`` for GAE, whitening and the advantage broadcast, which let the retrieved
  documents leak into the critic targets and the whitening statistics (spec section 6); here they never do.

Notation in the docstrings: ``m_t`` is ``loss_mask``, ``r_t`` the token reward, ``V_t`` the value, ``π`` the policy,
``π_old`` the policy that produced the rollout's ``old_logp``, ``π_ref`` the frozen reference.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from learners.config import ALGORITHMS, TOKEN_REWARD_ALGORITHMS

__all__ = [
    "ALGORITHMS",
    "KL_KINDS",
    "Advantages",
    "compute_advantages",
    "broadcast_to_tokens",
    "discounted_returns",
    "dr_grpo_advantages",
    "gae_advantages",
    "group_baseline",
    "grpo_advantages",
    "kl_estimate",
    "kl_penalized_rewards",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "place_sequence_reward",
    "reinforce_advantages",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "rloo_advantages",
]

GroupIds = Sequence[Hashable] | Tensor

# The k3 estimator can explode when the policy and the reference disagree wildly; the original clamps it to ±10.
LOW_VAR_KL_CLAMP = 10.0
# exp(log-ratio) overflows float32 near 88; beyond e^20 the clipped loss has no gradient for A > 0 anyway.
LOG_RATIO_CLAMP = 20.0
WHITEN_EPS = 1e-8


# ----------------------------------------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------------------------------------


def _as_mask(mask: Tensor, like: Tensor) -> Tensor:
    """A 0/1 float mask in the dtype of ``like`` (masks arrive as bool, int or float)."""
    return mask.to(dtype=like.dtype, device=like.device)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ_t m_t x_t over ``dim`` (all elements when ``dim`` is None).

    ``torch.where`` rather than ``x * mask`` so that a NaN or inf sitting on a masked position cannot leak through
    ``0 * inf``.
    """
    selected = torch.where(mask.bool(), x, torch.zeros_like(x))
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """mean = Σ_t m_t x_t / Σ_t m_t.

    An empty mask gives 0 instead of NaN, so a batch without model tokens logs 0 rather than poisoning the metrics.
    """
    m = _as_mask(mask, x)
    count = m.sum() if dim is None else m.sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """var = Σ_t m_t (x_t − mean)² / (n − 1), with n = Σ_t m_t (divide by n when ``unbiased`` is False).

    Always over all masked elements (a scalar): this is the statistic whitening needs.
    """
    m = _as_mask(mask, x)
    n = m.sum()
    mean = masked_mean(x, mask)
    sq_dev = masked_sum((x - mean) ** 2, mask)
    denom = (n - 1.0) if unbiased else n
    return sq_dev / denom.clamp(min=1.0)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """x̂_t = m_t · (x_t − μ) / sqrt(σ² + 1e-8), with μ and σ² taken over masked elements only.

    ``shift_mean=False`` adds μ back (x̂_t = m_t · ((x_t − μ)/σ + μ)): rescale without recentring.
    Unmasked positions come back as 0, so a whitened advantage never pushes on an observation token.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# ----------------------------------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------------------------------


def place_sequence_reward(scores: Tensor, loss_mask: Tensor) -> Tensor:
    """r_{i,t} = score_i if t = max{t : m_{i,t} = 1} else 0.

    The original used the last non-pad token, which is an observation token when a response is cut off inside an
    ``<information>`` block; the last sampled token is the action the reward is really about.
    A row without any model token cannot be credited and gets no reward (no token would carry its gradient anyway).
    """
    if scores.dim() != 1 or scores.shape[0] != loss_mask.shape[0]:
        raise ValueError(f"scores must be [B]={loss_mask.shape[0]}, got {tuple(scores.shape)}")
    batch, length = loss_mask.shape
    has_model_token = loss_mask.bool().any(dim=1)
    # argmax returns the first maximum, so flipping the mask finds the last 1.
    last = length - 1 - loss_mask.bool().flip(dims=[1]).to(torch.int8).argmax(dim=1)
    dtype = scores.dtype if scores.is_floating_point() else torch.float32
    token_rewards = torch.zeros(batch, length, dtype=dtype, device=loss_mask.device)
    rows = torch.arange(batch, device=loss_mask.device)
    token_rewards[rows, last] = torch.where(has_model_token, scores.to(dtype), torch.zeros_like(scores, dtype=dtype))
    return token_rewards


def kl_penalized_rewards(
    token_rewards: Tensor,
    logp_old: Tensor,
    ref_logp: Tensor,
    loss_mask: Tensor,
    beta: float,
    kind: str = "k1",
) -> Tensor:
    """r'_t = r_t − β · m_t · KL_t(π_old ‖ π_ref)  (PPO's KL-in-reward, k1 by default as in the original).

    Observation tokens were not sampled by the policy, so their "KL" is meaningless and was behind the negative-KL
    explosion reported upstream (SR1 PR#21); they are left untouched.
    """
    kl = kl_estimate(logp_old, ref_logp, kind)
    return token_rewards - beta * torch.where(loss_mask.bool(), kl, torch.zeros_like(kl))


# ----------------------------------------------------------------------------------------------------------------------
# Sequence-level advantage estimators: [B] scores in, [B] advantages out
# ----------------------------------------------------------------------------------------------------------------------


def broadcast_to_tokens(adv: Tensor, loss_mask: Tensor) -> Tensor:
    """A_{i,t} = m_{i,t} · A_i: a sequence advantage on every sampled token, 0 on observations and padding."""
    return adv.unsqueeze(-1) * _as_mask(loss_mask, adv)


def _group_indices(group_ids: GroupIds, batch: int) -> list[list[int]]:
    """Row indices of each group, in order of first appearance. Groups need not be contiguous."""
    ids = group_ids.tolist() if isinstance(group_ids, Tensor) else list(group_ids)
    if len(ids) != batch:
        raise ValueError(f"group_ids has {len(ids)} entries but there are {batch} scores")
    groups: dict[Hashable, list[int]] = {}
    for row, gid in enumerate(ids):
        groups.setdefault(gid, []).append(row)
    return list(groups.values())


def _float_scores(scores: Tensor) -> Tensor:
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [B], got shape {tuple(scores.shape)}")
    return scores.detach().to(torch.float32) if not scores.is_floating_point() else scores.detach()


def group_baseline(scores: Tensor, group_ids: GroupIds) -> tuple[Tensor, Tensor]:
    """Per-row group mean μ_g and unbiased standard deviation σ_g of the group the row belongs to.

    A singleton group gets μ = 0 and σ = 1, as the original does: its score passes through unchanged rather than
    being zeroed (there is no sibling to compare against).
    """
    scores = _float_scores(scores)
    mean = torch.zeros_like(scores)
    std = torch.ones_like(scores)
    for rows in _group_indices(group_ids, scores.shape[0]):
        if len(rows) < 2:
            continue
        idx = torch.tensor(rows, device=scores.device)
        members = scores[idx]
        mean[idx] = members.mean()
        std[idx] = members.std(unbiased=True)
    return mean, std


def reinforce_advantages(scores: Tensor) -> Tensor:
    """A_i = R_i: the paper's REINFORCE, the raw score with no baseline and no whitening."""
    return _float_scores(scores).clone()


def grpo_advantages(scores: Tensor, group_ids: GroupIds, eps: float = 1e-6, scale_by_std: bool = True) -> Tensor:
    """A_i = (R_i − μ_g) / (σ_g + ε), σ_g the unbiased std over the G rollouts of the same prompt.

    ``scale_by_std=False`` gives Dr. GRPO's A_i = R_i − μ_g. Singleton groups: μ = 0, σ = 1 (see ``group_baseline``).
    """
    scores = _float_scores(scores)
    mean, std = group_baseline(scores, group_ids)
    centred = scores - mean
    return centred / (std + eps) if scale_by_std else centred


def dr_grpo_advantages(scores: Tensor, group_ids: GroupIds) -> Tensor:
    """A_i = R_i − μ_g (Dr. GRPO: the std division biases toward easy and hard prompts, so it is dropped)."""
    return grpo_advantages(scores, group_ids, scale_by_std=False)


def rloo_advantages(scores: Tensor, group_ids: GroupIds) -> Tensor:
    """A_i = R_i − (1/(G−1)) Σ_{j≠i} R_j: leave-one-out baseline within the group; a singleton gets 0.

    A singleton has no other sample to form an unbiased baseline from, so it carries no signal.
    """
    scores = _float_scores(scores)
    adv = torch.zeros_like(scores)
    for rows in _group_indices(group_ids, scores.shape[0]):
        if len(rows) < 2:
            continue
        idx = torch.tensor(rows, device=scores.device)
        members = scores[idx]
        others_mean = (members.sum() - members) / (len(rows) - 1)
        adv[idx] = members - others_mean
    return adv


# ----------------------------------------------------------------------------------------------------------------------
# Token-level advantage estimators: [B, T] in, [B, T] out. They walk model tokens only.
# ----------------------------------------------------------------------------------------------------------------------


def discounted_returns(token_rewards: Tensor, loss_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = r_t + γ · G_{next(t)} on model tokens, next(t) the next model token (observations are jumped over).

    One γ per action: an ``<information>`` gap is the environment's turn, not steps of the policy.
    Rewards on non-model tokens are ignored; the result is 0 there.
    """
    token_rewards = token_rewards.detach()
    mask = loss_mask.bool()
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.shape[1])):
        candidate = token_rewards[:, t] + gamma * running
        # Off-mask positions keep the running return of the next model token unchanged.
        running = torch.where(mask[:, t], candidate, running)
        returns[:, t] = torch.where(mask[:, t], candidate, torch.zeros_like(candidate))
    return returns


def reinforce_pp_advantages(token_rewards: Tensor, loss_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """REINFORCE++: A_t = whiten_batch(G_t), G_t the discounted return-to-go over model tokens.

    The whitening statistics are global: all masked tokens of the whole batch, not per sequence or per group.
    """
    return masked_whiten(discounted_returns(token_rewards, loss_mask, gamma), loss_mask)


def reinforce_pp_baseline_advantages(scores: Tensor, group_ids: GroupIds, loss_mask: Tensor) -> Tensor:
    """REINFORCE++-baseline: A_{i,t} = whiten_batch(m_{i,t} · (R_i − μ_g)).

    The group mean removes the prompt's difficulty; the global whitening then sets the scale (instead of GRPO's
    per-group std). Singleton groups use μ = 0, as in ``group_baseline``.
    """
    scores = _float_scores(scores)
    mean, _ = group_baseline(scores, group_ids)
    return masked_whiten(broadcast_to_tokens(scores - mean, loss_mask), loss_mask)


def gae_advantages(
    token_rewards: Tensor,
    values: Tensor,
    loss_mask: Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over model tokens only.

        δ_t = r_t + γ V_{next(t)} − V_t
        A_t = δ_t + γλ A_{next(t)}
        R_t = A_t + V_t  (the critic's target)

    next(t) is the next token with m = 1; past the last one, V and A are 0. Observation tokens are skipped entirely:
    their values, rewards and positions take no part, so a model token before an ``<information>`` gap bootstraps
    from the first model token after it. (The original ran GAE over the attention mask, so the critic's guesses on
    retrieved text leaked into the targets.) Advantages and returns are 0 off the mask. Whitening is separate:
    ``masked_whiten(advantages, loss_mask)``.
    """
    token_rewards = token_rewards.detach()
    values = values.detach()
    mask = loss_mask.bool()
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        on = mask[:, t]
        advantages[:, t] = torch.where(on, adv_t, torch.zeros_like(adv_t))
        # Carrying the successor's value and advantage across an off-mask position is what makes the gap invisible.
        next_value = torch.where(on, values[:, t], next_value)
        next_adv = torch.where(on, adv_t, next_adv)
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


# ----------------------------------------------------------------------------------------------------------------------
# KL estimators
# ----------------------------------------------------------------------------------------------------------------------

KL_KINDS = ("k1", "k2", "k3", "low_var_kl")


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimates of KL(π ‖ π_ref) from samples of π (Schulman's k1/k2/k3), with d = log π − log π_ref.

        k1 = d
        k2 = ½ d²
        k3 = e^{−d} + d − 1 = e^{ref − logp} − (ref − logp) − 1, clamped to [−10, 10]  ("low_var_kl")

    k3 is unbiased, non-negative and low-variance; the clamp matches the original and stops a single wild token
    from dominating the loss.
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind in ("k3", "low_var_kl"):
        neg = -log_ratio  # ref − logp
        return (torch.exp(neg) - neg - 1.0).clamp(min=-LOW_VAR_KL_CLAMP, max=LOW_VAR_KL_CLAMP)
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {', '.join(KL_KINDS)}")


# ----------------------------------------------------------------------------------------------------------------------
# Choosing an estimator: train.algorithm (its names: learners/config.py)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Advantages:
    """What an estimator hands the learners: ``[B, T]`` advantages (0 off the mask) and, for PPO, critic targets."""

    advantages: Tensor
    returns: Tensor | None = None
    reward_kl: float = 0.0  # mean KL_t(π_old ‖ π_ref) over model tokens, when it was folded into the reward


def compute_advantages(
    algorithm: str,
    scores: Tensor,
    group_ids: GroupIds,
    loss_mask: Tensor,
    *,
    values: Tensor | None = None,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    kl_in_reward_coef: float = 0.0,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> Advantages:
    """The advantages of ``train.algorithm`` from [B] sequence scores, ``[B, T]`` masks and, as needed, values and
    logprobs:

        grpo, dr_grpo, rloo, reinforce        sequence advantage broadcast to the model tokens
        reinforce_pp                          whitened return-to-go of the token rewards
        reinforce_pp_baseline                 whitened (R − group mean)
        ppo                                   whitened GAE(γ, λ) over the critic's ``values``; returns = A + V

    ``kl_in_reward_coef`` β > 0 subtracts β · (log π_old − log π_ref) from every model token's reward first (PPO's
    KL-in-reward, k1 as in the paper); only the token-reward estimators can take it.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
    if kl_in_reward_coef and algorithm not in TOKEN_REWARD_ALGORITHMS:
        raise ValueError(f"{algorithm} has no per-token rewards to put a KL penalty in; "
                         f"use the KL loss, or one of {', '.join(TOKEN_REWARD_ALGORITHMS)}")
    sequence = {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages, "rloo": rloo_advantages}
    if algorithm in sequence:
        return Advantages(broadcast_to_tokens(sequence[algorithm](scores, group_ids), loss_mask))
    if algorithm == "reinforce":
        return Advantages(broadcast_to_tokens(reinforce_advantages(scores), loss_mask))
    if algorithm == "reinforce_pp_baseline":
        return Advantages(reinforce_pp_baseline_advantages(scores, group_ids, loss_mask))

    rewards = place_sequence_reward(_float_scores(scores), loss_mask)
    reward_kl = 0.0
    if kl_in_reward_coef:
        if old_logp is None or ref_logp is None:
            raise ValueError("a KL penalty in the reward needs old_logp and ref_logp")
        rewards = kl_penalized_rewards(rewards, old_logp, ref_logp, loss_mask, kl_in_reward_coef, kind="k1")
        reward_kl = masked_mean(kl_estimate(old_logp, ref_logp, "k1"), loss_mask).item()
    if algorithm == "reinforce_pp":
        return Advantages(reinforce_pp_advantages(rewards, loss_mask, gamma), reward_kl=reward_kl)
    if values is None:
        raise ValueError("ppo needs the critic's values")
    advantages, returns = gae_advantages(rewards, values, loss_mask, gamma, lam)
    return Advantages(masked_whiten(advantages, loss_mask), returns, reward_kl)
