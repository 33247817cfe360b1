"""The PPO critic: a value head on the policy's transformer, trained on GAE returns with a clipped value loss.

``CriticCore`` is the testable core (no Ray); ``CriticActor`` is the thin Ray actor around it, one per data-parallel
rank, started with ``LearnerGroup`` like the policy learners.

V_t is read at the position that predicts response token t, i.e. the value of the state in which token t is chosen.
Observation tokens get values too (the forward runs over them) but nothing uses them: GAE skips them and the loss
masks them (``algorithms.gae_advantages``, ``loss_mask``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from learners.algorithms import masked_sum
from learners.batch import LearnerSample
from learners.engine import DeepSpeedCore
from learners.forward import MicroBatch
from learners.losses import token_mean_loss, value_loss
from learners.shell import LearnerActor


class ValueModel(nn.Module):
    """The policy's backbone (no LM head) and a linear head to one scalar per position.

    The head starts at zero, so the first values are 0 and the first GAE advantages are the plain returns: a random
    head would add noise of the order of the hidden states' scale to every advantage of the first steps.
    """

    def __init__(self, backbone: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.value_head(hidden).squeeze(-1)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    @property
    def config(self):
        return self.backbone.config


def response_values(model: nn.Module, mb: MicroBatch) -> Tensor:
    """fp32 values ``[B, R]``: V at the position that predicts each response token."""
    values = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask)
    return values.gather(1, mb.positions).float()


class CriticCore(DeepSpeedCore):
    """The critic's update. Every sample needs ``returns`` and ``old_values`` (the values GAE used)."""

    shares_prompts = False  # the value head reads every position's hidden state, not response_hidden

    def build_model(self, model_path: str) -> nn.Module:
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(model_path, dtype=torch.float32)
        return ValueModel(backbone, backbone.config.hidden_size)

    def values(self, samples: Sequence[LearnerSample]) -> list[list[float]]:
        """Per response token V_t under the current weights."""
        return self._per_token(samples, response_values)

    def _value_loss(self, mb: MicroBatch, n_global: float) -> tuple[Tensor, dict[str, float]]:
        mask = mb.loss_mask
        values = response_values(self.engine, mb)
        loss_tok = value_loss(values, mb.old_values, mb.returns, self.cfg.value_clip)
        with torch.no_grad():
            clipped = (values - mb.old_values).abs() > self.cfg.value_clip
            sums = {
                "value_loss": masked_sum(loss_tok, mask).item(),
                "values_mean": masked_sum(values, mask).item(),
                "returns_mean": masked_sum(mb.returns, mask).item(),
                "value_clip_frac": masked_sum(clipped.float(), mask).item(),
            }
        return token_mean_loss(loss_tok, mask, n_global), sums

    def train_step(self, samples: Sequence[LearnerSample],
                   mini_batches: Sequence[Sequence[int]] | None = None) -> dict[str, float]:
        """``ppo_epochs`` passes of value regression, one optimizer step per mini-batch (as the policy's update)."""
        for s in samples:
            if len(s.returns) != s.response_len or len(s.old_values) != s.response_len:
                raise ValueError(f"a critic sample needs returns and old_values for each of its {s.response_len} "
                                 f"response tokens, got {len(s.returns)} and {len(s.old_values)}")
        sums, n_global, plan = self._update(samples, self._value_loss, mini_batches, self.cfg.ppo_epochs)
        metrics = {f"critic/{k}": v / n_global for k, v in sums.items()}
        update = self.update_metrics("critic", plan)
        metrics.update({"critic/grad_norm": update["critic/grad_norm"], "critic/lr": update["critic/lr"]})
        return metrics


class CriticActor(LearnerActor):
    """The Ray actor of one data-parallel critic rank (``LearnerGroup(CriticActor, ...)``)."""

    core_cls = CriticCore

    def values(self, samples: Sequence[LearnerSample]) -> list[list[float]]:
        return self.core.values(samples)

