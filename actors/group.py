"""N rollout actors driven as one: the twin of ``learners/group.py`` on the rollout side.

Training, simulator-data collection and evaluation all start policy engines the same way, spread their requests over
them the same way (request ``k`` goes to engine ``k mod N``), and read the finished groups back as they stream in;
``RolloutGroup`` is that once. Every wait is bounded: a stalled engine raises ``TimeoutError`` instead of hanging the
caller.

An engine that dies mid-rollout (its process killed, out of memory) is restarted in place, given the weights it
should serve (``restore_weights``), and the requests whose groups had not come back yet run again on it. A group is
yielded whole or not at all, so nothing is lost and nothing is counted twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray

from actors.rollout import EpisodeRequest, RolloutActor, RolloutConfig
from actors.trajectory import Trajectory

logger = logging.getLogger(__name__)

# How often a streaming wait wakes up to ask whether the caller has given up (a run that is closing).
POLL_S = 5.0


def shard(items: Sequence, n: int) -> list[list]:
    """Item ``k`` to engine ``k mod n``: neighbouring requests (often one question's) spread over every engine."""
    return [list(items[k::n]) for k in range(n)]


def unshard(parts: Sequence[Sequence]) -> list:
    """The inverse of ``shard``: per-engine results back in request order."""
    n, total = len(parts), sum(len(p) for p in parts)
    return [parts[i % n][i // n] for i in range(total)]


class RolloutGroup:
    """``num_engines`` ``RolloutActor``s serving ``policy_path``. Creating the group starts them; ``ready`` waits.

    ``weight_fault`` is fault injection: ``(engine, version, mode)`` makes that engine spoil its load of that weight
    version (``actors/rollout.RolloutCore.load_weights``). ``restore_weights(actor)`` puts the current weights on a
    restarted engine; without it a restarted engine serves ``policy_path``. ``max_restarts`` bounds the restarts of
    one engine within one ``stream`` call."""

    def __init__(self, policy_path: str, engine_kwargs: dict, search_factory: Callable, rollout_cfg: RolloutConfig,
                 env: dict[str, str], num_engines: int = 1, num_gpus: float = 0,
                 validation_factory: Callable | None = None, weight_fault: tuple[int, int, str] | None = None,
                 start_timeout_s: float = 600.0, max_restarts: int = 2) -> None:
        if num_engines < 1:
            raise ValueError(f"a rollout group needs at least one engine, got {num_engines}")
        self.start_timeout_s = start_timeout_s
        self.max_restarts = max_restarts
        self.restore_weights: Callable[[Any], None] | None = None
        self.counters = {"engine_restarts": 0, "rerun_groups": 0, "engines_killed": 0}
        self._start = lambda k: (
            ray.remote(RolloutActor).options(num_cpus=1, num_gpus=num_gpus, max_concurrency=10_000)
            .remote(policy_path, engine_kwargs, search_factory, rollout_cfg, env, validation_factory,
                    weight_fault=weight_fault[1:] if weight_fault and weight_fault[0] == k else None))
        self.actors = [self._start(k) for k in range(num_engines)]

    def __len__(self) -> int:
        return len(self.actors)

    def ready(self, timeout_s: float) -> None:
        ray.get([a.ready.remote() for a in self.actors], timeout=timeout_s)

    def shards(self, items: Sequence) -> list[list]:
        return shard(items, len(self.actors))

    def stream(self, requests: Sequence[EpisodeRequest], group_size: int, noise_prob: float, deadline: float,
               temperature: float | None = None, validation_engine: bool = False,
               abandoned: Callable[[], bool] = lambda: False, what: str = "rollout",
               kill_engine: int | None = None) -> Iterator[list[Trajectory]]:
        """Every request rolled out ``group_size`` times; yields each finished group as it arrives. ``deadline`` is a
        ``time.perf_counter()`` time; past it, ``TimeoutError``. ``abandoned()`` is asked at every wake-up, and a
        true answer ends the wait with ``RuntimeError``. ``kill_engine`` is fault injection: that engine's process
        SIGKILLs itself once its first group is done, while its other groups are still running."""
        args = (group_size, noise_prob, temperature, validation_engine)
        shards = {k: shard for k, shard in enumerate(self.shards(requests)) if shard}
        if kill_engine in shards and len(shards[kill_engine]) > 1:  # with one group nothing would be in flight
            self.counters["engines_killed"] += 1
        else:
            kill_engine = None
        streams = {k: self._open(k, shard, (*args, k == kill_engine)) for k, shard in shards.items()}
        for k, shard in shards.items():
            waiting = {r.group_id: r for r in shard}
            restarts = 0
            while waiting:
                try:
                    for group in self._read(streams[k], deadline, abandoned, what):
                        waiting.pop(group[0].group_id, None)
                        yield group
                    break  # the stream ended: every group of this engine came back
                except ray.exceptions.RayActorError as error:
                    restarts += 1
                    if restarts > self.max_restarts:
                        raise RuntimeError(f"{what}: rollout engine {k} died {restarts} times; giving up") from error
                    self._restart(k, error)
                    self.counters["rerun_groups"] += len(waiting)
                    streams[k] = self._open(k, list(waiting.values()), (*args, False))

    def _open(self, k: int, requests: list[EpisodeRequest], args: tuple):
        return self.actors[k].rollout.options(num_returns="streaming").remote(requests, *args)

    @staticmethod
    def _read(stream, deadline: float, abandoned: Callable[[], bool], what: str) -> Iterator[list[Trajectory]]:
        while True:
            ready, _ = ray.wait([stream], timeout=min(POLL_S, max(0.0, deadline - time.perf_counter())))
            if abandoned():
                raise RuntimeError(f"{what} abandoned: the run is closing")
            if not ready and time.perf_counter() < deadline:
                continue
            if not ready:
                raise TimeoutError(f"{what} did not finish before its deadline")
            try:
                ref = next(stream)
            except StopIteration:
                return
            yield ray.get(ref, timeout=60)

    def _restart(self, k: int, error: BaseException) -> None:
        """A fresh actor in engine ``k``'s place (the list is shared with the weight sync, so it is replaced in
        place), with the weights the others serve."""
        logger.warning("rollout engine %d died (%s); restarting it", k, type(error).__name__)
        self.actors[k] = self._start(k)
        ray.get(self.actors[k].ready.remote(), timeout=self.start_timeout_s)
        if self.restore_weights is not None:
            self.restore_weights(self.actors[k])
        self.counters["engine_restarts"] += 1

    def answer(self, requests: Sequence[EpisodeRequest], retrieve: bool, top_k: int,
               timeout_s: float) -> list[dict[str, Any]]:
        """The Direct (``retrieve=False``) or RAG baseline on every request; the rows in request order."""
        shards = self.shards(requests)
        parts = ray.get([a.answer.remote(s, retrieve, top_k) for a, s in zip(self.actors, shards) if s],
                        timeout=timeout_s)
        return unshard(parts + [[]] * (len(shards) - len(parts)))

    def raw_generate(self, prompts: Sequence[list[int]], max_tokens: int, timeout_s: float) -> None:
        """Plain vLLM ``generate`` of ``prompts`` spread over the engines, for the throughput probe."""
        ray.get([a.raw_generate.remote(s, max_tokens) for a, s in zip(self.actors, self.shards(prompts)) if s],
                timeout=timeout_s)

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
