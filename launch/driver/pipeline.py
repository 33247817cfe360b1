"""Rollouts ahead of training: the steps' episode batches, collected in the background with bounded staleness.

``train.max_staleness = K``. Step k trains on the batch of step k while the batches of steps k+1 … k+K are rolled out.
The engines' weights only change between rollouts (``wait_idle`` before every sync), so each episode is sampled from
one policy version and, since a batch can start at most K syncs before it is trained on, lags at most K versions.
K = 0 is the strictly on-policy loop: collect, train, sync, in turn.

One collection runs at a time (a one-thread executor), in step order, so prompts are drawn from the sampler in the same
order as in the on-policy loop, and each batch keeps the sampler's state right after its own draw: that, not the
sampler's live state (already past the prefetched steps), is what a checkpoint of that step must save.

Dynamic filtering (``train.dynamic_filter``) happens here too: a group whose rewards are all equal has zero GRPO
advantage and teaches nothing, so it is dropped and replaced by groups of fresh prompts. The batch still records the
reward of every episode rolled: that, not the kept groups' mean, is how well the policy did this step.

Replay of rare successes (``replay.prompts``, ``launch/driver/replay.py``) happens here as well: a share of a step's
questions comes from the buffer, and each kept episode joins its question's new group. A batch keeps the buffer's
state after its own rollout, for its checkpoint, as it keeps the sampler's.
"""

from __future__ import annotations

import concurrent.futures
import copy
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepBatch:
    """One step's episodes and what the driver logs and checkpoints about them."""

    step: int
    trajectories: list
    noise_prob: float
    prompt_uids: list[str]
    sampler_state: dict[str, Any]
    gen_s: float  # wall time of this batch's rollouts (all rounds)
    groups_rolled: int = 0
    groups_kept: int = 0
    groups_informative: int = 0  # groups whose rewards are not all equal, of all rolled
    rounds: int = 1
    # Every episode sampled for this step, kept by the dynamic filter or not, and without the replayed episodes of
    # earlier steps: what the rollout metrics describe. Over the kept groups alone, the reward by hop count would read
    # the share of mixed groups, not how well the policy does.
    rolled_trajectories: list = field(default_factory=list)
    replay_state: dict[str, Any] | None = None  # the replay buffer after this batch's rollout (None: replay off)
    replay_metrics: dict[str, float] = field(default_factory=dict)
    replayed_uids: set[str] = field(default_factory=set)  # episodes of earlier steps that joined this batch's groups

    @property
    def rolled_rewards(self) -> list[float]:
        return [t.reward for t in self.rolled_trajectories]

    @property
    def pass_rate(self) -> float:
        return self.groups_kept / max(self.groups_rolled, 1)

    @property
    def signal_share(self) -> float:
        """Share of the rolled groups whose rewards differ: only those give a group baseline a signal to learn."""
        return self.groups_informative / max(self.groups_rolled, 1)

    @property
    def score_mean(self) -> float:
        """Mean reward over every episode rolled for this step: what is logged and what the curriculum observes."""
        return statistics.fmean(self.rolled_rewards)


def informative_groups(trajectories: list) -> tuple[list, int, int]:
    """The trajectories of groups whose rewards are not all equal; also how many groups there were and were kept."""
    groups: dict[str, list] = defaultdict(list)
    for t in trajectories:
        groups[t.group_id].append(t)
    kept = [g for g in groups.values() if len({t.reward for t in g}) > 1]
    return [t for g in kept for t in g], len(groups), len(kept)


class RolloutQueue:
    """The batches of the next steps, each collected by ``rollout(prompts, noise_prob, step, first_index)``."""

    def __init__(self, rollout: Callable, sampler, curriculum, prompts_per_step: int, total_steps: int,
                 max_staleness: int, timeout_s: float, dynamic_filter: bool = False, filter_rounds: int = 0,
                 replay=None) -> None:
        self.rollout = rollout
        self.replay = replay if replay is not None and replay.enabled else None
        self.sampler = sampler
        self.curriculum = curriculum
        self.prompts_per_step = prompts_per_step
        self.total_steps = total_steps
        self.max_staleness = max_staleness
        self.timeout_s = timeout_s
        self.dynamic_filter = dynamic_filter
        self.filter_rounds = filter_rounds
        self.pending: dict[int, concurrent.futures.Future] = {}
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")

    def fill(self, step: int) -> None:
        """Start the rollouts of steps ``step`` … ``step + K`` that are not under way yet."""
        for j in range(step, min(step + self.max_staleness, self.total_steps) + 1):
            if j not in self.pending:
                self.pending[j] = self.executor.submit(self._collect, j)

    def take(self, step: int) -> tuple[StepBatch, float]:
        """Step ``step``'s batch, and how long the driver waited for it."""
        started = time.perf_counter()
        batch = self.pending.pop(step).result(timeout=self._limit())
        return batch, time.perf_counter() - started

    def wait_idle(self) -> float:
        """Block until no rollout is running (the engines can take new weights); return the wait."""
        started = time.perf_counter()
        for future in list(self.pending.values()):
            future.exception(timeout=self._limit())  # finished, one way or the other; errors surface in take()
        return time.perf_counter() - started

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _limit(self) -> float:
        # Each collection is bounded by the rollout timeout per round; this only guards against a lost thread.
        return self.timeout_s * (1 + self.filter_rounds) * (1 + self.max_staleness) + 60

    def _collect(self, step: int) -> StepBatch:
        started = time.perf_counter()
        noise_prob = self.curriculum.noise_prob(step)
        replayed = self.replay.draw(self.prompts_per_step) if self.replay else []
        prompts = [e.example for e in replayed] + self.sampler.next(self.prompts_per_step - len(replayed))
        trajectories, rolled = self._rolled(prompts, noise_prob, step, 0, replayed)
        batch = StepBatch(step, trajectories, noise_prob, [p.uid for p in prompts], {}, 0.0,
                          rolled_trajectories=rolled)
        if self.dynamic_filter:
            kept, rolled, n_kept = informative_groups(trajectories)
            first_index = len(prompts)
            while n_kept < self.prompts_per_step and batch.rounds <= self.filter_rounds:
                more = self.sampler.next(self.prompts_per_step - n_kept)
                refill, rolled_now = self._rolled(more, noise_prob, step, first_index, [])
                batch.rolled_trajectories += rolled_now
                fresh, fresh_rolled, fresh_kept = informative_groups(refill)
                first_index += len(more)
                kept, rolled, n_kept = kept + fresh, rolled + fresh_rolled, n_kept + fresh_kept
                batch.prompt_uids += [p.uid for p in more]
                batch.rounds += 1
            batch.groups_rolled, batch.groups_kept, batch.groups_informative = rolled, n_kept, n_kept
            # Nothing informative at all: keep the whole batch (its advantages are 0; the KL and entropy terms still
            # act) rather than stall the curriculum and the schedule. The driver may skip its update instead
            # (train.skip_update_without_signal).
            batch.trajectories = kept if kept else trajectories
        else:
            _, batch.groups_rolled, batch.groups_informative = informative_groups(trajectories)
            batch.groups_kept = batch.groups_rolled
        batch.sampler_state = copy.deepcopy(self.sampler.state_dict())
        if self.replay:
            batch.replay_state, batch.replay_metrics = self.replay.state_dict(), self.replay.metrics()
            batch.replayed_uids = set(self.replay.rejoined_uids)
        batch.gen_s = time.perf_counter() - started
        return batch

    def _rolled(self, prompts: list, noise_prob: float, step: int, first_index: int,
                replayed: list) -> tuple[list, list]:
        """The groups of ``prompts``, the first ``len(replayed)`` of which each get their replayed episode; and the
        episodes rolled now, which say how well the policy does (the replayed ones do not)."""
        rolled = self.rollout(prompts, noise_prob, step, first_index)
        if not self.replay:
            return rolled, list(rolled)
        from launch.driver.sampler import group_ids

        ids = group_ids(prompts, step, first_index)
        return self.replay.observe(rolled, dict(zip(ids, prompts)), dict(zip(ids, replayed))), list(rolled)
