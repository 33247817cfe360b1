"""Supervised fine-tuning on the same DeepSpeed machinery: the policy warm-up on scripted protocol demonstrations,
and simulator tuning.

Cross-entropy on ``loss_mask == 1`` tokens only, so ``<information>`` blocks are masked exactly as in RL: the model
learns to write queries and answers, never to predict the documents it is shown.
"""

from __future__ import annotations

from collections.abc import Sequence

import ray
from torch import Tensor

from learners.algorithms import masked_sum, token_mean_loss
from learners.batch import LearnerSample
from learners.engine import DeepSpeedCore, MicroBatch, response_logits, token_logprobs
from learners.policy import LearnerActorShell


class SFTTrainer(DeepSpeedCore):
    """Token-mean negative log-likelihood of the masked response tokens; one optimizer step per ``train_step``."""

    def _nll_loss(self, mb: MicroBatch, n_global: float) -> tuple[Tensor, dict[str, float]]:
        nll = -token_logprobs(response_logits(self.engine, mb), mb.targets)
        return token_mean_loss(nll, mb.loss_mask, n_global), {"loss": masked_sum(nll.detach(), mb.loss_mask).item()}

    def train_step(self, samples: Sequence[LearnerSample]) -> dict[str, float]:
        lr = self.current_lr()
        sums, n_global, plan = self._accumulate(samples, self._nll_loss)
        return {
            "sft/loss": sums["loss"] / n_global,
            "sft/grad_norm": self.grad_norm(),
            "sft/lr": lr,
            "sft/padding_share": plan.padding_share,
            "sft/num_tokens": n_global,
        }


class SFTLearnerActor(LearnerActorShell):
    core_cls = SFTTrainer


SFTLearner = ray.remote(SFTLearnerActor)
