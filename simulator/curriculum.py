"""The noise curriculum: the probability that a simulated search returns noisy documents (spec section 4).

At training step i each search call independently gets noisy documents with probability p_i (useful ones
otherwise), so the policy first learns the search format against helpful results and then learns to cope with bad
ones. The paper's schedule is exponential; linear, cosine and constant are ablations, and the reward-adaptive one is
new to this project: it raises the noise while the policy is doing well and lowers it when it struggles.

All turns of a step share one p_i. Steps start at 1; step 0 gives p_start.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass
class CurriculumConfig:
    """Settings for every schedule; each schedule reads the fields it needs.

    Attributes:
        name: the schedule, one of ``CURRICULA`` ("exp", "linear", "cosine", "constant", "adaptive").
        p_start: noise probability at the start (p_s). The paper's README uses 0 at HEAD, 0.25 originally.
        p_end: noise probability reached at ``total_steps`` and kept after (p_e). Also the constant schedule's value.
        base: the exponential schedule's base b; larger keeps the noise low for longer. The original fixes it at 4.
        total_steps: the step m at which the schedule reaches ``p_end``: the run's total training steps (203).
        target_reward: adaptive only. The recent mean reward above which the noise rises, below which it falls.
        step_size: adaptive only. How much the noise probability moves per observation.
        window: adaptive only. How many of the latest mean rewards are averaged (fewer until that many are seen).
        p_min: adaptive only. Lower clamp of the noise probability.
        p_max: adaptive only. Upper clamp of the noise probability.
        p_init: adaptive only. Noise probability before any reward has been observed.
    """

    name: str = "exp"
    p_start: float = 0.0
    p_end: float = 0.5
    base: float = 4.0
    total_steps: int = 203
    target_reward: float = 0.4
    step_size: float = 0.01
    window: int = 5
    p_min: float = 0.0
    p_max: float = 0.5
    p_init: float = 0.0


def _check_probability(field_name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{field_name} must be in [0, 1], got {value}")


def _check_step(step: int) -> None:
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")


class Curriculum:
    """A noise schedule. Stateless schedules depend on the step only; state exists for the adaptive one."""

    name = "base"

    def __init__(self, cfg: CurriculumConfig) -> None:
        _check_probability("p_start", cfg.p_start)
        _check_probability("p_end", cfg.p_end)
        if cfg.total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {cfg.total_steps}")
        self.cfg = cfg

    def noise_prob(self, step: int) -> float:
        """The probability that a search at global training step ``step`` gets noisy documents."""
        _check_step(step)
        if step >= self.cfg.total_steps:
            return self.cfg.p_end  # exactly, not up to rounding
        progress = step / self.cfg.total_steps
        return self.cfg.p_start + self._ramp(progress) * (self.cfg.p_end - self.cfg.p_start)

    def _ramp(self, progress: float) -> float:
        """Maps progress in [0, 1] to the fraction of the way from p_start to p_end; 0 -> 0 and 1 -> 1."""
        raise NotImplementedError

    def observe(self, mean_reward: float) -> None:
        """Report a step's mean training reward. Only the adaptive schedule uses it."""

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state of curriculum {state.get('name')!r} cannot be loaded into {self.name!r}")


class ExponentialCurriculum(Curriculum):
    """The paper's schedule: p_i = p_s + (b^(i/m) - 1) / (b - 1) * (p_e - p_s); slow at first, fast near the end."""

    name = "exp"

    def __init__(self, cfg: CurriculumConfig) -> None:
        super().__init__(cfg)
        if cfg.base <= 0 or cfg.base == 1:
            raise ValueError(f"base must be positive and not 1, got {cfg.base}")

    def _ramp(self, progress: float) -> float:
        return (self.cfg.base**progress - 1) / (self.cfg.base - 1)


class LinearCurriculum(Curriculum):
    name = "linear"

    def _ramp(self, progress: float) -> float:
        return progress


class CosineCurriculum(Curriculum):
    """Half a cosine: flat at both ends, steepest in the middle."""

    name = "cosine"

    def _ramp(self, progress: float) -> float:
        return (1 - math.cos(math.pi * progress)) / 2


class ConstantCurriculum(Curriculum):
    """p_end at every step: noise from the first step on, no curriculum."""

    name = "constant"

    def noise_prob(self, step: int) -> float:
        _check_step(step)
        return self.cfg.p_end


class AdaptiveCurriculum(Curriculum):
    """Reward-driven noise: up by ``step_size`` while the recent mean reward beats ``target_reward``, down below it.

    The recent mean is over the last ``window`` observed rewards (fewer until ``window`` have been seen); a mean
    exactly on target leaves the noise unchanged. The probability stays within [p_min, p_max] and ignores the step.
    """

    name = "adaptive"

    def __init__(self, cfg: CurriculumConfig) -> None:
        super().__init__(cfg)
        for field_name in ("p_min", "p_max", "p_init"):
            _check_probability(field_name, getattr(cfg, field_name))
        if cfg.p_min > cfg.p_max:
            raise ValueError(f"p_min ({cfg.p_min}) must not exceed p_max ({cfg.p_max})")
        if cfg.window < 1:
            raise ValueError(f"window must be at least 1, got {cfg.window}")
        if cfg.step_size < 0:
            raise ValueError(f"step_size must be non-negative, got {cfg.step_size}")
        self.prob = self._clamp(cfg.p_init)
        self.recent_rewards: deque[float] = deque(maxlen=cfg.window)

    def _clamp(self, prob: float) -> float:
        return min(max(prob, self.cfg.p_min), self.cfg.p_max)

    def noise_prob(self, step: int) -> float:
        _check_step(step)
        return self.prob

    def observe(self, mean_reward: float) -> None:
        self.recent_rewards.append(float(mean_reward))
        recent_mean = sum(self.recent_rewards) / len(self.recent_rewards)
        if recent_mean > self.cfg.target_reward:
            self.prob = self._clamp(self.prob + self.cfg.step_size)
        elif recent_mean < self.cfg.target_reward:
            self.prob = self._clamp(self.prob - self.cfg.step_size)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "prob": self.prob, "recent_rewards": list(self.recent_rewards)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.prob = float(state["prob"])
        self.recent_rewards = deque((float(r) for r in state["recent_rewards"]), maxlen=self.cfg.window)


CURRICULA: dict[str, type[Curriculum]] = {
    schedule.name: schedule
    for schedule in (
        ExponentialCurriculum,
        LinearCurriculum,
        CosineCurriculum,
        ConstantCurriculum,
        AdaptiveCurriculum,
    )
}


def build_curriculum(cfg: CurriculumConfig | Mapping[str, Any]) -> Curriculum:
    """The schedule ``cfg.name`` names. A mapping (e.g. a Hydra node) is read as CurriculumConfig fields."""
    if not isinstance(cfg, CurriculumConfig):
        cfg = CurriculumConfig(**dict(cfg))
    if cfg.name not in CURRICULA:
        raise ValueError(f"unknown curriculum {cfg.name!r}; choose one of {sorted(CURRICULA)}")
    return CURRICULA[cfg.name](cfg)
