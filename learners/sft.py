"""Supervised fine-tuning on the same DeepSpeed machinery: the policy warm-up on scripted protocol demonstrations,
and simulator tuning.

Cross-entropy on ``loss_mask == 1`` tokens only, so ``<information>`` blocks are masked exactly as in RL: the model
learns to write queries and answers, never to predict the documents it is shown.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from learners.algorithms import masked_sum
from learners.batch import LearnerSample
from learners.engine import DeepSpeedCore
from learners.forward import MicroBatch, model_token_logprobs
from learners.losses import token_mean_loss
from learners.shell import LearnerActor


class SFTCore(DeepSpeedCore):
    """Token-mean negative log-likelihood of the masked response tokens; one optimizer step per ``train_step``."""

    def _nll_loss(self, mb: MicroBatch, n_global: float) -> tuple[Tensor, dict[str, float]]:
        nll = -model_token_logprobs(self.engine, mb)[0]
        return token_mean_loss(nll, mb.loss_mask, n_global), {"loss": masked_sum(nll.detach(), mb.loss_mask).item()}

    def train_step(self, samples: Sequence[LearnerSample],
                   mini_batches: Sequence[Sequence[int]] | None = None) -> dict[str, float]:
        sums, n_global, plan = self._update(samples, self._nll_loss, mini_batches)
        update = self.update_metrics("sft", plan)
        return {"sft/loss": sums["loss"] / n_global,
                **{f"sft/{k}": update[f"sft/{k}"] for k in ("grad_norm", "lr", "padding_share", "num_tokens")}}


class SFTActor(LearnerActor):
    core_cls = SFTCore

