"""Fault injection in a training run (``faults=…``, ``FaultsConfig``): which fault happens at which step, and what it
did, as ``faults/*`` metrics.

Each kill is real. The simulator server is killed by its pool, just before the step's next search reaches it
(``simulator/pool.arm_kill``). The rollout engine SIGKILLs itself once its first group of the step is done, so its
other groups are in flight (``actors/group.RolloutGroup.stream``). The learner is killed just before the update. The
replies' delay and garbage live in the pool (``simulator/faults.py``); a spoiled weight load lives in the engine
(``actors/rollout.RolloutCore.load_weights``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FaultsConfig:
    """Faults injected on purpose, to see a run survive them (``faults=NAME``, ``conf/faults/``). Off by default and
    usable in any run. Every kill is real (``ray.kill``, or the engine's own SIGKILL); each fault is counted
    (``faults/*``).

    Attributes:
        kill_simulator_at: steps at which simulator server 0 is killed, just before the step's next search reaches it.
        kill_simulator_every: also every N steps (0: never).
        kill_rollout_at: steps at which rollout engine 0 SIGKILLs itself once its first group of the step is done,
            with its other groups still running.
        kill_learner_at: steps at which learner rank 0 is killed, just before the step's update. The run stops: a
            learner's optimizer state cannot be rebuilt mid-run, so the run is resumed (``resume=auto``).
        garble_share: share of simulator replies replaced by garbage (``simulator/faults.py``).
        garble_kinds: the garbage, in turn: ``empty``, ``binary``, ``long`` (50,000 characters), ``no_docs``.
        delay_simulator_s: every simulator reply is held back this long.
        corrupt_weight_load_at: the weight version (= the step that publishes it) whose load engine 0 spoils; -1: none.
        corrupt_mode: ``scale``: the load completes and its checksum matches, then the token embedding is doubled, so
            only the canary can catch it. ``skip``: the engine ignores the load, which the version check catches.
    """

    kill_simulator_at: list[int] = field(default_factory=list)
    kill_simulator_every: int = 0
    kill_rollout_at: list[int] = field(default_factory=list)
    kill_learner_at: list[int] = field(default_factory=list)
    garble_share: float = 0.0
    garble_kinds: list[str] = field(default_factory=lambda: ["empty", "binary", "long", "no_docs"])
    delay_simulator_s: float = 0.0
    corrupt_weight_load_at: int = -1
    corrupt_mode: str = "scale"


class LearnerDiedError(RuntimeError):
    """A learner actor died: its optimizer state is gone, so the run stops and is resumed from a checkpoint."""


class FaultPlan:
    """When each fault of ``FaultsConfig`` happens, and the count of each one injected so far."""

    def __init__(self, cfg: FaultsConfig) -> None:
        if cfg.corrupt_mode not in ("scale", "skip"):
            raise ValueError(f"faults.corrupt_mode={cfg.corrupt_mode!r}: expected scale or skip")
        if cfg.kill_simulator_every < 0:
            raise ValueError(f"faults.kill_simulator_every={cfg.kill_simulator_every}: expected 0 (never) or more")
        self.cfg = cfg
        self.injected = {"simulator_kills": 0, "learner_kills": 0}  # the rollout group counts its engine kills

    def kill_simulator(self, step: int) -> bool:
        every = self.cfg.kill_simulator_every
        return step in self.cfg.kill_simulator_at or bool(every and step % every == 0)

    def kill_rollout(self, step: int) -> bool:
        return step in self.cfg.kill_rollout_at

    def kill_learner(self, step: int) -> bool:
        return step in self.cfg.kill_learner_at

    def weight_fault(self) -> tuple[int, int, str] | None:
        """``(engine, version, mode)`` for the rollout group, or None."""
        if self.cfg.corrupt_weight_load_at < 0:
            return None
        return 0, self.cfg.corrupt_weight_load_at, self.cfg.corrupt_mode

    def reply_faults(self, seed: int):
        from simulator.faults import ReplyFaults

        return ReplyFaults(garble_share=self.cfg.garble_share, garble_kinds=list(self.cfg.garble_kinds),
                           delay_s=self.cfg.delay_simulator_s, seed=seed)

    def metrics(self, rollout_counters: dict[str, int], pool_stats: dict, group_sizes: list[int], group_size: int,
                requested_groups: int) -> dict[str, float]:
        """What was injected and what the run did about it. ``group_sizes`` are the episodes of each group this step
        rolled: ``faults/lost_episodes`` counts the episodes asked for that never came back (whole groups missing
        included), ``faults/duplicate_episodes`` the ones that came back twice. Both are 0 when the step is whole."""
        missing_groups = max(0, requested_groups - len(group_sizes))
        lost = sum(max(0, group_size - n) for n in group_sizes) + missing_groups * group_size
        return {**{f"faults/{k}": float(v) for k, v in self.injected.items()},
                "faults/rollout_kills": float(rollout_counters.get("engines_killed", 0)),
                "faults/rollout_restarts": float(rollout_counters.get("engine_restarts", 0)),
                "faults/rerun_groups": float(rollout_counters.get("rerun_groups", 0)),
                "faults/garbled_replies": float(pool_stats.get("garbled", 0)),
                "faults/simulator_restarts": float(pool_stats.get("restarts", 0)),
                "faults/lost_episodes": float(lost),
                "faults/duplicate_episodes": float(sum(max(0, n - group_size) for n in group_sizes))}
