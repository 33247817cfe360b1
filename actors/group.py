"""N rollout actors driven as one: the twin of ``learners/group.py`` on the rollout side.

Training, simulator-data collection and evaluation all start policy engines the same way, spread their requests over
them the same way (request ``k`` goes to engine ``k mod N``), and read the finished groups back as they stream in;
``RolloutGroup`` is that once. Every wait is bounded: a stalled engine raises ``TimeoutError`` instead of hanging the
caller.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray

from actors.rollout import EpisodeRequest, RolloutActor, RolloutConfig
from actors.trajectory import Trajectory

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

    ``skip_weight_loads_of`` is a fault hook for tests: that engine ignores every weight load."""

    def __init__(self, policy_path: str, engine_kwargs: dict, search_factory: Callable, rollout_cfg: RolloutConfig,
                 env: dict[str, str], num_engines: int = 1, num_gpus: float = 0,
                 validation_factory: Callable | None = None, skip_weight_loads_of: int = -1) -> None:
        if num_engines < 1:
            raise ValueError(f"a rollout group needs at least one engine, got {num_engines}")
        self.actors = [
            ray.remote(RolloutActor).options(num_cpus=1, num_gpus=num_gpus, max_concurrency=10_000)
            .remote(policy_path, engine_kwargs, search_factory, rollout_cfg, env, validation_factory,
                    skip_weight_loads=k == skip_weight_loads_of)
            for k in range(num_engines)
        ]

    def __len__(self) -> int:
        return len(self.actors)

    def ready(self, timeout_s: float) -> None:
        ray.get([a.ready.remote() for a in self.actors], timeout=timeout_s)

    def shards(self, items: Sequence) -> list[list]:
        return shard(items, len(self.actors))

    def stream(self, requests: Sequence[EpisodeRequest], group_size: int, noise_prob: float, deadline: float,
               temperature: float | None = None, validation_engine: bool = False,
               abandoned: Callable[[], bool] = lambda: False, what: str = "rollout") -> Iterator[list[Trajectory]]:
        """Every request rolled out ``group_size`` times; yields each finished group as it arrives. ``deadline`` is a
        ``time.perf_counter()`` time; past it, ``TimeoutError``. ``abandoned()`` is asked at every wake-up, and a
        true answer ends the wait with ``RuntimeError``."""
        streams = [actor.rollout.options(num_returns="streaming").remote(shard, group_size, noise_prob, temperature,
                                                                         validation_engine)
                   for actor, shard in zip(self.actors, self.shards(requests)) if shard]
        for stream in streams:
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
                    break
                yield ray.get(ref, timeout=60)

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
