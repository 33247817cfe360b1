"""The simulator pool as one Ray actor: ``SimulatorPoolActor`` owns the vLLM server actors, restarts them, and shares
one router, one set of counters and one cache among every rollout actor of a run. ``create_simulator_pool`` starts it.

The routing itself is the pure asyncio core in ``simulator/pool.py``; this module is only its Ray shell.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Hashable
from typing import Any

from simulator.config import SimulatorConfig
from simulator.faults import ReplyFaults
from simulator.pool import SimulatorPool
from simulator.server import SimulatorServer, live_nodes_offering, start_server

logger = logging.getLogger(__name__)


class RayServerHandle:
    """A server actor as the pool sees it. A cancelled call (timeout) also cancels the actor task, which aborts the
    vLLM request, so abandoned requests do not keep using the server."""

    def __init__(self, actor: Any, pinned: bool = False) -> None:
        self.actor = actor
        self.pinned = pinned  # it asked for the config's placement resource

    async def generate(self, prompt: Any, sampling: dict[str, Any] | None) -> dict[str, Any]:
        import ray

        ref = self.actor.generate.remote(prompt, sampling)
        try:
            return await ref
        except asyncio.CancelledError:
            ray.cancel(ref)
            raise

    def health(self) -> Awaitable[dict[str, Any]]:
        return self.actor.health.remote()


class SimulatorPoolActor:
    """The pool as one Ray actor: it owns the server actors, restarts them, and shares counters and cache.

    Create it with ``create_simulator_pool``. ``server_cls`` replaces the server body (tests use a never-answering
    server to test the pool's timeouts on the real Ray stack).
    """

    def __init__(self, cfg: SimulatorConfig, server_cls: type | None = None, faults: ReplyFaults | None = None) -> None:
        self.cfg = cfg
        self.server_cls = server_cls or SimulatorServer
        self.pool = SimulatorPool(
            cfg,
            [self._make(i) for i in range(cfg.num_servers)],
            make_server=self._make,
            kill_server=self._kill,
            faults=faults,
            stranded=self._stranded,
        )
        self._health_task: asyncio.Task | None = None

    def _make(self, index: int) -> RayServerHandle:
        """A new server, on a simulation node while a live one is left (``SimulatorConfig.placement_resource``)."""
        pinned = bool(self.cfg.placement_resource) and bool(live_nodes_offering(self.cfg.placement_resource))
        if self.cfg.placement_resource and not pinned:
            logger.warning("no live node offers %r any more: simulator server %d starts wherever the cluster has "
                           "room", self.cfg.placement_resource, index)
        return RayServerHandle(start_server(self.cfg, index, self.server_cls, pinned=pinned), pinned)

    def _stranded(self, handle: RayServerHandle) -> bool:
        """A server waiting for a simulation node that the cluster no longer has: it would never start."""
        return handle.pinned and not live_nodes_offering(self.cfg.placement_resource)

    @staticmethod
    def _kill(handle: RayServerHandle) -> None:
        import ray

        ray.kill(handle.actor, no_restart=True)

    async def ready(self) -> dict[str, Any]:
        """Wait for every server to load its model; then start the background health checks."""
        await self.pool.wait_ready()
        if self._health_task is None:
            self._health_task = asyncio.get_running_loop().create_task(self.pool.health_loop())
        return self.pool.stats()

    async def generate(
        self, prompt: Any, cache_key: Hashable | None = None, sampling: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return await self.pool.generate(prompt, cache_key, sampling)

    async def check_health(self) -> dict[int, bool]:
        return await self.pool.check_health()

    async def stats(self) -> dict[str, Any]:
        import ray

        return {**self.pool.stats(), "router_node": ray.get_runtime_context().get_node_id()}

    async def arm_kill(self, index: int) -> None:
        self.pool.arm_kill(index)

    async def server_actor(self, index: int) -> Any:
        """The current actor handle of one server (tests kill it to check restarts)."""
        return self.pool.slots[index].handle.actor

    async def shutdown(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        for task in list(self.pool._tasks):
            task.cancel()
        for slot in self.pool.slots:
            try:
                self._kill(slot.handle)
            except Exception:  # noqa: BLE001 - already gone
                pass


def create_simulator_pool(
    cfg: SimulatorConfig, server_cls: type | None = None, wait: bool = True, name: str | None = None,
    faults: ReplyFaults | None = None,
) -> Any:
    """Start the pool actor and its servers; with ``wait``, block until every server has loaded its model.

    The pool actor takes no CPU of its own (it only routes), so it never competes with the servers for a slot.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if cfg.placement_resource and not live_nodes_offering(cfg.placement_resource):
        raise ValueError(f"simulator.placement_resource={cfg.placement_resource!r}: no live node of the cluster "
                         f"offers it; start the simulation nodes with `ray start --resources="
                         f"'{{\"{cfg.placement_resource}\": 1}}'`, or leave the key empty")
    # The router lives on the node that starts it (the driver's): a lost simulation node must take its servers with
    # it, not the pool.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    options = {"num_cpus": 0, "max_concurrency": 10_000, "name": name, "scheduling_strategy": here}
    actor = ray.remote(SimulatorPoolActor).options(**options).remote(cfg, server_cls, faults)
    if wait:
        wait_for_pool(actor, cfg)
    return actor


def wait_for_pool(actor: Any, cfg: SimulatorConfig) -> None:
    """Block until every server of a pool started with ``wait=False`` has loaded its model."""
    import ray

    ray.get(actor.ready.remote(), timeout=cfg.startup_timeout_s + 60)
