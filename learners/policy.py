"""The policy learner: PPO-clip + KL-to-reference + entropy, on model tokens only, one optimizer step per RL step.

``PolicyCore`` is the testable core (no Ray); ``PolicyActor`` is the thin Ray actor around it, one per
data-parallel rank; ``LearnerGroup`` (``learners/group.py``) is the driver's handle on a group of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from learners.algorithms import kl_estimate, masked_sum
from learners.batch import LearnerSample
from learners.engine import DeepSpeedCore
from learners.forward import MicroBatch, model_token_logprobs, on_model_tokens
from learners.losses import (
    combine_policy_loss,
    entropy_from_logits,
    policy_gradient_loss,
    token_mean_loss,
    truncated_importance_weights,
)
from learners.shell import LearnerActor


class PolicyCore(DeepSpeedCore):
    """The actor's update. Every sample needs ``advantages``; ``ref_logprobs`` when ``kl_coef > 0``."""

    def _policy_loss(self, mb: MicroBatch, n_global: float) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        mask = mb.loss_mask
        logp, logits = model_token_logprobs(self.engine, mb)  # logits only where the loss reads them
        # No old logprobs: the update is on-policy, ratio 1 (the gradient is still A ∇log π).
        old = torch.where(mb.has_old & mask, mb.old_logprobs, logp.detach())
        pg_tok, stats = policy_gradient_loss(logp, old, mb.advantages, cfg.clip_eps, cfg.clip_eps_high,
                                             cfg.dual_clip, loss_mask=mask)
        tis = torch.ones_like(pg_tok)
        if cfg.tis_cap is not None:
            # old_logprobs were recomputed by the learner; the engine's sampling distribution differs from it (stale
            # weights, sampler numerics), and w = min(π_old/π_rollout, C) corrects for that.
            tis = torch.where(mb.has_rollout & mask, truncated_importance_weights(old, mb.rollout_logprobs,
                                                                                  cfg.tis_cap), tis)
            pg_tok = pg_tok * tis
        ref = torch.where(mb.has_ref & mask, mb.ref_logprobs, logp.detach())
        kl_tok = kl_estimate(logp, ref, cfg.kl_kind)
        if cfg.entropy_coef != 0:
            ent_tok = on_model_tokens(entropy_from_logits(logits), mask)
        else:
            with torch.no_grad():
                ent_tok = on_model_tokens(entropy_from_logits(logits), mask)
        total = combine_policy_loss(pg_tok, kl_tok if cfg.kl_coef else None, ent_tok, cfg.kl_coef, cfg.entropy_coef)
        loss = token_mean_loss(total, mask, n_global)
        n_local = float(mask.sum().item())
        with torch.no_grad():
            sums = {
                "pg_loss": masked_sum(pg_tok, mask).item(),
                "kl": masked_sum(kl_tok, mask).item(),
                "entropy": masked_sum(ent_tok, mask).item(),
                "clip_frac": stats.clip_frac * n_local,
                "approx_kl": stats.approx_kl * n_local,
                "ratio_mean": stats.ratio_mean * n_local,
                "ratio_max": stats.ratio_max,
                "tis_weight": masked_sum(tis, mask).item(),
            }
        return loss, sums

    def train_step(self, samples: Sequence[LearnerSample],
                   mini_batches: Sequence[Sequence[int]] | None = None) -> dict[str, float]:
        """One RL update over ``samples`` (this rank's share of the batch): ``ppo_epochs`` passes, one optimizer step
        per mini-batch (``mini_batches``: index lists into ``samples``; default ``cfg.mini_batch_size`` runs).

        Metrics are token means over the whole global batch (all ranks), taken during the last epoch's forwards;
        ``actor/grad_norm`` is the mean over that epoch's optimizer steps.
        """
        for s in samples:
            if len(s.advantages) != s.response_len:
                raise ValueError(f"a policy sample needs one advantage per response token ({s.response_len}), "
                                 f"got {len(s.advantages)}")
            if self.cfg.kl_coef > 0 and not s.ref_logprobs:
                raise ValueError("kl_coef > 0 but a sample has no ref_logprobs (compute them with the reference model)")
        sums, n_global, plan = self._update(samples, self._policy_loss, mini_batches, self.cfg.ppo_epochs)
        return {f"actor/{k}": v if k.endswith("_max") else v / n_global for k, v in sums.items()} | \
            self.update_metrics("actor", plan)


class PolicyActor(LearnerActor):
    """The Ray actor of one data-parallel policy rank (``LearnerGroup(PolicyActor, ...)`` starts a group)."""

    core_cls = PolicyCore
