"""What the learners consume: one ``LearnerSample`` per trajectory, built by the driver.

``learners`` never imports ``actors``: the driver turns rollout trajectories (and their advantages) into these
plain records, so the learner side can be tested, and reused for supervised fine-tuning, without any rollout code.

Positions: ``input_ids = prompt + response``. Every per-token list below has ``len(response)`` entries and is aligned
with the response tokens; token ``t`` of the response is predicted from position ``prompt_len + t - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LearnerSample:
    input_ids: list[int]
    prompt_len: int
    loss_mask: list[int]  # 1 where the policy sampled the token, 0 on observations and padding
    advantages: list[float] = field(default_factory=list)  # per response token; empty for SFT
    old_logprobs: list[float] = field(default_factory=list)  # behaviour policy's logprobs (rollout or recomputed)
    rollout_logprobs: list[float] = field(default_factory=list)  # the engine's, when old_logprobs were recomputed (TIS)
    ref_logprobs: list[float] = field(default_factory=list)  # reference model's logprobs, for the KL loss
    returns: list[float] = field(default_factory=list)  # PPO critic targets
    old_values: list[float] = field(default_factory=list)  # PPO critic values at rollout time
    policy_version: int = 0

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.prompt_len

    def validate(self) -> None:
        n = self.response_len
        if n <= 0:
            raise ValueError(f"sample has no response tokens (prompt_len={self.prompt_len}, len={len(self.input_ids)})")
        for name in ("loss_mask", "advantages", "old_logprobs", "rollout_logprobs", "ref_logprobs", "returns",
                     "old_values"):
            values = getattr(self, name)
            if values and len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} response tokens")
