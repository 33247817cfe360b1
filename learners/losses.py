"""The per-token losses of the policy and the critic, and the exact token mean that turns them into one scalar.

Pure torch, no Ray or DeepSpeed, like the estimators they consume (``learners/algorithms.py``, whose conventions and
notation hold here: ``[B, T]`` tensors, ``loss_mask`` 1 on sampled tokens only). Each loss comes back per token;
``token_mean_loss`` turns it into the scalar that is backpropagated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from learners.algorithms import LOG_RATIO_CLAMP, kl_estimate, masked_mean, masked_sum

# ----------------------------------------------------------------------------------------------------------------------
# Losses: each returns [B, T]; aggregate with token_mean_loss
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class PolicyLossStats:
    """Diagnostics of the PPO-clip loss, masked means over model tokens (plain floats, detached)."""

    clip_frac: float  # tokens where the ratio clip set the loss (its gradient is 0 there)
    dual_clip_frac: float  # negative-advantage tokens where the dual clip capped the loss
    approx_kl: float  # k3 estimate of KL(π_old ‖ π) on this batch: how far the update has moved
    ratio_mean: float
    ratio_max: float


def policy_gradient_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    loss_mask: Tensor | None = None,
) -> tuple[Tensor, PolicyLossStats]:
    """PPO-clip, per token, with ρ_t = π(a_t)/π_old(a_t):

        L_t = max(−ρ_t A_t, −clip(ρ_t, 1 − ε_low, 1 + ε_high) A_t)          (ε_high = ε_low unless given: DAPO's
                                                                           clip-higher)
        dual clip (c > 1), for A_t < 0 only:  L_t = min(L_t, −c A_t)

    The dual clip bounds the loss of a negative-advantage token whose ratio has grown huge (for A < 0 the standard
    clip leaves ρ unbounded above). ``loss_mask`` only scopes the statistics; the loss itself is masked by the
    aggregation.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    log_ratio = (logp - old_logp).clamp(min=-LOG_RATIO_CLAMP, max=LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    dual_hit = torch.zeros_like(loss, dtype=torch.bool)
    if dual_clip is not None:
        cap = -advantages * dual_clip
        dual_hit = (advantages < 0) & (loss > cap)
        loss = torch.where(dual_hit, cap, loss)

    with torch.no_grad():
        mask = torch.ones_like(loss, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
        clip_hit = (clipped > unclipped) & ~dual_hit
        stats = PolicyLossStats(
            clip_frac=masked_mean(clip_hit.float(), mask).item(),
            dual_clip_frac=masked_mean(dual_hit.float(), mask).item(),
            approx_kl=masked_mean(kl_estimate(old_logp, logp, "k3"), mask).item(),
            ratio_mean=masked_mean(ratio, mask).item(),
            ratio_max=ratio[mask].max().item() if mask.any() else 0.0,
        )
    return loss, stats


def entropy_from_logits(logits: Tensor) -> Tensor:
    """H_t = −Σ_v p_v log p_v = logsumexp(z) − Σ_v softmax(z)_v z_v, for logits z of shape [..., V] → [...].

    The logsumexp form never forms log p of a tiny probability, so large logits stay finite. Logits must be finite
    (a −inf from a sampling-time mask would give 0·∞).
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float = 0.5) -> Tensor:
    """Clipped critic loss: L_t = ½ max((V_t − R_t)², (V_old,t + clip(V_t − V_old,t, −c, c) − R_t)²).

    The clipped branch stops a single update from moving the value far from the one GAE used.
    """
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns).square(), (clipped_values - returns).square())


def truncated_importance_weights(old_logp: Tensor, rollout_logp: Tensor, cap: float) -> Tensor:
    """w_t = min(π_old(a_t) / π_rollout(a_t), C), without gradient (truncated importance sampling, TIS).

    vLLM's sampler and the trainer's forward disagree slightly (and more so when rollouts are a version behind);
    multiplying the per-token loss by w_t corrects the off-policy gap, and the cap bounds its variance.
    """
    with torch.no_grad():
        log_ratio = (old_logp - rollout_logp).clamp(max=LOG_RATIO_CLAMP)
        return torch.exp(log_ratio).clamp(max=cap)


def combine_policy_loss(
    pg_tok: Tensor,
    kl_tok: Tensor | None,
    ent_tok: Tensor | None,
    kl_coef: float,
    entropy_coef: float,
) -> Tensor:
    """L_t = L^pg_t + β_kl · KL_t − β_ent · H_t, per token.

    The KL is ADDED: minimising L pulls π towards π_ref. The original subtracted it (spec section 7, issue #10),
    which rewards drifting away from the reference; a negative ``kl_coef`` is refused so that bug cannot come back
    through a config. The entropy is subtracted because a larger entropy is the bonus.
    """
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0 (the KL term is added to the loss), got {kl_coef}")
    total = pg_tok
    if kl_tok is not None and kl_coef != 0:
        total = total + kl_coef * kl_tok
    if ent_tok is not None and entropy_coef != 0:
        total = total - entropy_coef * ent_tok
    return total


# ----------------------------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------------------------


def token_mean_loss(loss_per_token: Tensor, loss_mask: Tensor, global_num_tokens: float | Tensor) -> Tensor:
    """ℓ_micro = Σ_{t ∈ micro-batch} m_t L_t / N_global, N_global = Σ m_t over the WHOLE global batch.

    N_global counts the model tokens of every micro-batch on every data-parallel rank that contributes to the same
    optimizer step (all-reduce the local counts by SUM once, before the micro-batch loop). Then

        Σ_{ranks} Σ_{micro-batches} ℓ_micro = Σ_all m_t L_t / N_global,

    the exact token mean of the full batch, however it was split; dividing each micro-batch by its own token count
    would overweight tokens of short micro-batches.

    How a caller uses it:
    * Gradients summed across ranks and micro-batches (plain accumulation + all-reduce SUM): backward ℓ_micro as is.
    * A framework that AVERAGES gradients over N ranks (DDP, DeepSpeed): backward ``ℓ_micro * N`` so the average of
      the N rank gradients is the sum above.
    * A framework that also divides by the number of accumulation steps k (DeepSpeed's ``engine.backward`` scales
      the loss by 1/k by default): multiply by k as well, or turn that scaling off.
    """
    if isinstance(global_num_tokens, Tensor):
        if (global_num_tokens <= 0).any():
            raise ValueError(f"global_num_tokens must be positive, got {global_num_tokens}")
        denom = global_num_tokens.to(loss_per_token.dtype)
    else:
        if global_num_tokens <= 0:
            raise ValueError(f"global_num_tokens must be positive, got {global_num_tokens}")
        denom = float(global_num_tokens)
    return masked_sum(loss_per_token, loss_mask) / denom
