"""A finished episode, as the rollout side hands it to the driver (DESIGN section 4)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EpisodeStats:
    turns: int = 0  # generations made
    searches: int = 0
    opened_searches: int = 0  # searches whose tag the environment wrote (``RolloutConfig.open_search_share``)
    queries: list[str] = field(default_factory=list)
    documents: list[list[str]] = field(default_factory=list)  # each search's documents, for simulator tuning
    noisy: list[bool | None] = field(default_factory=list)  # the simulator's draw per search (None: real engine)
    failed_searches: int = 0
    valid_actions: int = 0  # turns that ended in a parsable <search> or <answer>
    invalid_actions: int = 0
    answered: bool = False
    finish_reason: str = ""  # answer | max_turns | length | error
    error: str = ""  # why a generation failed (finish reason error)
    generated_tokens: int = 0
    observation_tokens: int = 0
    generation_s: float = 0.0
    search_s: float = 0.0


@dataclass
class Trajectory:
    uid: str  # unique per episode
    group_id: str  # unique per prompt: GRPO groups are keyed by it
    prompt_ids: list[int]
    response_ids: list[int]  # model tokens and observation tokens, interleaved as they happened
    loss_mask: list[int]  # 1 on sampled tokens, 0 on observations and the invalid-action message
    rollout_logprobs: list[float]  # the engine's logprob per response token (0.0 on observations)
    reward: float
    golden_answers: tuple[str, ...]
    data_source: str
    policy_version: int
    noise_prob: float
    stats: EpisodeStats
    response_text: str = ""

    def check(self) -> None:
        n = len(self.response_ids)
        if not (len(self.loss_mask) == len(self.rollout_logprobs) == n):
            raise ValueError(f"trajectory {self.uid}: response {n}, mask {len(self.loss_mask)}, "
                             f"logprobs {len(self.rollout_logprobs)} tokens")
