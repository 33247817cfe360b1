"""Routing simulator calls over N vLLM servers, with timeouts, bounded retries, restarts, a cache and counters.

Design: ``SimulatorPool`` is a pure asyncio core over a list of server handles. It knows nothing of Ray except through
two callables: ``make_server(index)`` creates a fresh server and ``kill_server(handle)`` gets rid of one. A handle is
anything with ``generate(prompt, sampling)`` and ``health()`` returning awaitables, which a Ray actor's method refs are
(wrapped by ``RayServerHandle``) and which fakes in unit tests are too. ``SimulatorPoolActor``
(``simulator/pool_actor.py``) is the thin Ray shell: one actor per run, so every rollout actor shares one router, one
set of counters and one cache.

What happens to a call (``generate``):
1. A cache hit returns at once (when ``cache_size > 0``).
2. Otherwise it goes to the live server with the fewest outstanding requests, bounded by ``request_timeout_s``.
3. A failure (the actor died, an error, a timeout) is retried on another live server, up to ``max_attempts`` tries.
   A ``ValueError`` from the server means the request itself is bad (a prompt too long for the context) and is
   not retried.
   A server whose actor died is restarted in the background. A server that timed out gets a health check, and is
   restarted when that fails too; a live but busy server is not killed for being slow.
4. When every try fails, the call returns the spec's "No information available" with ``failed=True`` and counts a
   failure. It never hangs: the original client retried forever and stalled training (issue #24).

Fault injection (``faults`` in training): ``ReplyFaults`` delays or garbles replies that did arrive
(``simulator/faults.py``), and ``arm_kill`` kills a server for real when the next call arrives.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from simulator.base import NO_INFORMATION
from simulator.config import SimulatorConfig
from simulator.faults import ReplyFaults, ReplyGarbler

logger = logging.getLogger(__name__)


class ServerHandle(Protocol):
    """What the pool needs of a server: two awaitable calls. The pool bounds both with timeouts."""

    def generate(self, prompt: Any, sampling: dict[str, Any] | None) -> Awaitable[dict[str, Any]]: ...

    def health(self) -> Awaitable[dict[str, Any]]: ...


@dataclass
class _Slot:
    """One server position in the pool. The handle changes on restart; the index and the counters stay."""

    index: int
    handle: Any
    alive: bool = True
    outstanding: int = 0
    calls: int = 0
    failures: int = 0
    restarts: int = 0
    restart_task: asyncio.Task | None = field(default=None, repr=False)


class _LRU:
    def __init__(self, size: int) -> None:
        self.size = size
        self.data: OrderedDict[Hashable, dict[str, Any]] = OrderedDict()

    def get(self, key: Hashable) -> dict[str, Any] | None:
        if key not in self.data:
            return None
        self.data.move_to_end(key)
        return self.data[key]

    def put(self, key: Hashable, value: dict[str, Any]) -> None:
        self.data[key] = value
        self.data.move_to_end(key)
        while len(self.data) > self.size:
            self.data.popitem(last=False)


def _is_actor_death(error: BaseException) -> bool:
    """Ray's "the actor is gone" errors, told apart from an exception raised inside a live server."""
    try:
        import ray.exceptions as rex
    except ImportError:  # the core is usable without Ray
        return False
    return isinstance(error, (rex.RayActorError, rex.ActorDiedError, rex.ActorUnavailableError))


_BAD_REQUEST = "bad request"


class ServerDead(RuntimeError):
    """Raised by fake handles in tests (and usable by other transports) to say the server is gone for good."""


class SimulatorPool:
    """The async routing core. Use it from one event loop (the pool actor's)."""

    def __init__(
        self,
        cfg: SimulatorConfig,
        handles: list[Any],
        make_server: Callable[[int], Any] | None = None,
        kill_server: Callable[[Any], None] | None = None,
        faults: ReplyFaults | None = None,
        stranded: Callable[[Any], bool] | None = None,
    ) -> None:
        if not handles:
            raise ValueError("SimulatorPool needs at least one server")
        self.cfg = cfg
        self.slots = [_Slot(index=i, handle=h) for i, h in enumerate(handles)]
        self.make_server = make_server
        self.kill_server = kill_server
        self.stranded = stranded  # a new server that can never be placed (its node was lost): start another
        self.cache = _LRU(cfg.cache_size) if cfg.cache_size > 0 else None
        self.latencies: deque[float] = deque(maxlen=cfg.latency_window)
        self.counters = {"calls": 0, "ok": 0, "failures": 0, "cache_hits": 0, "tokens": 0, "prompt_tokens": 0,
                         "attempts": 0, "retries": 0, "timeouts": 0, "errors": 0, "restarts": 0,
                         "restart_failures": 0, "garbled": 0, "killed": 0}
        self.faults = faults or ReplyFaults()
        self.garble = ReplyGarbler(self.faults)
        self.kill_armed: int | None = None  # a server to kill at the next call (fault injection)
        self._rr = 0  # rotates ties in the least-outstanding choice, so idle servers share the load
        self._tasks: set[asyncio.Task] = set()  # background tasks must be referenced, or asyncio may collect them

    # ---- routing -----------------------------------------------------------------------------------------------

    def pick(self, exclude: set[int] = frozenset()) -> _Slot | None:
        """The live server with the fewest outstanding requests, preferring ones this call has not tried yet."""
        live = [s for s in self.slots if s.alive]
        fresh = [s for s in live if s.index not in exclude]
        candidates = fresh or live
        if not candidates:
            return None
        n = len(self.slots)
        self._rr = (self._rr + 1) % n
        return min(candidates, key=lambda s: (s.outstanding, (s.index - self._rr) % n))

    async def generate(
        self, prompt: Any, cache_key: Hashable | None = None, sampling: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """One simulator reply: ``text``, ``num_tokens``, ``failed``, ``error``, ``cache_hit``, ``server``,
        ``attempts``, ``latency_s`` (and ``prompt_tokens``, ``finish_reason`` from the server). Never raises for
        server trouble and never waits longer than about ``max_attempts * request_timeout_s``.
        """
        start = time.perf_counter()
        self.counters["calls"] += 1
        key = (cache_key, self.cfg.cache_version) if cache_key is not None else None
        if self.cache is not None and key is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.counters["cache_hits"] += 1
                self.counters["ok"] += 1
                self.latencies.append(time.perf_counter() - start)
                return {**hit, "cache_hit": True, "attempts": 0, "latency_s": time.perf_counter() - start}

        if self.kill_armed is not None:
            self._kill_now(self.slots[self.kill_armed])
        tried: set[int] = set()
        errors: list[str] = []
        for attempt in range(self.cfg.max_attempts):
            slot = self.pick(exclude=tried)
            if slot is None:
                slot = await self._wait_for_any_server()
                if slot is None:
                    errors.append("no live server")
                    break
            if attempt:
                self.counters["retries"] += 1
            tried.add(slot.index)
            self.counters["attempts"] += 1
            reply, error = await self._try(slot, prompt, sampling)
            if reply is not None:
                reply = await self._spoil(reply)
                self.counters["ok"] += 1
                self.counters["tokens"] += int(reply.get("num_tokens", 0))
                self.counters["prompt_tokens"] += int(reply.get("prompt_tokens", 0))
                result = {**reply, "failed": False, "error": "", "cache_hit": False, "server": slot.index}
                if self.cache is not None and key is not None:
                    self.cache.put(key, {k: v for k, v in result.items() if k not in ("attempts", "latency_s")})
                self.latencies.append(time.perf_counter() - start)
                return {**result, "attempts": attempt + 1, "latency_s": time.perf_counter() - start}
            errors.append(f"server {slot.index}: {error}")
            if error.startswith(_BAD_REQUEST):
                break  # the request itself is wrong (a prompt too long for the context): another server fails too

        self.counters["failures"] += 1
        logger.warning("simulator call failed after %d attempt(s): %s", len(errors), "; ".join(errors))
        self.latencies.append(time.perf_counter() - start)
        return {"text": NO_INFORMATION, "num_tokens": 0, "failed": True, "error": "; ".join(errors)[-2000:],
                "cache_hit": False, "server": -1, "attempts": len(errors), "latency_s": time.perf_counter() - start}

    async def _try(self, slot: _Slot, prompt: Any, sampling: dict[str, Any] | None) -> tuple[dict | None, str]:
        """One attempt on one server. Returns (reply, "") or (None, why), and marks the server dead when it is."""
        handle = slot.handle
        slot.outstanding += 1
        slot.calls += 1
        try:
            reply = await asyncio.wait_for(_awaitable(handle.generate(prompt, sampling)), self.cfg.request_timeout_s)
            return reply, ""
        except asyncio.TimeoutError:
            self.counters["timeouts"] += 1
            slot.failures += 1
            self._spawn(self._check_after_timeout(slot, handle))
            return None, f"timed out after {self.cfg.request_timeout_s:g}s"
        except ValueError as error:  # Ray re-raises a server's ValueError as one: a bad request, not a bad server
            self.counters["errors"] += 1
            return None, f"{_BAD_REQUEST}: {str(error)[-300:]}"
        except Exception as error:  # noqa: BLE001 - any server trouble becomes a retry, never a crash of the pool
            slot.failures += 1
            self.counters["errors"] += 1
            if _is_actor_death(error) or isinstance(error, ServerDead):
                self.mark_dead(slot, handle, f"{type(error).__name__}")
            return None, f"{type(error).__name__}: {str(error)[:300]}"
        finally:
            slot.outstanding -= 1

    async def _spoil(self, reply: dict[str, Any]) -> dict[str, Any]:
        """Fault injection: hold the reply back, or replace its text by garbage (both off unless asked for)."""
        if self.faults.delay_s > 0:
            await asyncio.sleep(self.faults.delay_s)
        text, garbled = self.garble(str(reply.get("text", "")))
        if not garbled:
            return reply
        self.counters["garbled"] += 1
        return {**reply, "text": text, "garbled": True}

    def arm_kill(self, index: int) -> None:
        """Fault injection: kill server ``index`` (its process, for real) when the next call arrives, so that call and
        the others in flight find it dead."""
        if not 0 <= index < len(self.slots):
            raise ValueError(f"no simulator server {index}: the pool has {len(self.slots)}")
        self.kill_armed = index

    def _kill_now(self, slot: _Slot) -> None:
        self.kill_armed = None
        if self.kill_server is None:
            raise RuntimeError("this pool was built without kill_server: it cannot inject a server kill")
        logger.warning("fault injection: killing simulator server %d", slot.index)
        self.kill_server(slot.handle)
        self.counters["killed"] += 1

    async def _wait_for_any_server(self) -> _Slot | None:
        """Every server is down: wait (bounded) for a restart in progress rather than failing at once."""
        tasks = [s.restart_task for s in self.slots if s.restart_task is not None and not s.restart_task.done()]
        if not tasks:
            return None
        await asyncio.wait(tasks, timeout=self.cfg.request_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        return self.pick()

    # ---- health and restarts ---------------------------------------------------------------------------------

    def mark_dead(self, slot: _Slot, handle: Any, why: str, force: bool = False) -> None:
        """Take a server out of routing and restart it, once per dead handle (many calls may see the same death).

        ``force`` retries the restart of a server that is already marked dead (a restart that failed before).
        """
        if slot.handle is not handle or not (slot.alive or force):
            return
        logger.warning("simulator server %d is down (%s); restarting it", slot.index, why)
        slot.alive = False
        if self.make_server is not None:
            slot.restart_task = self._spawn(self._restart(slot, handle))

    async def _check_after_timeout(self, slot: _Slot, handle: Any) -> None:
        if slot.handle is handle and slot.alive and not await self._healthy(handle):
            self.mark_dead(slot, handle, "timed out and failed its health check")

    async def _healthy(self, handle: Any, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(_awaitable(handle.health()), timeout or self.cfg.health_timeout_s)
            return True
        except Exception:  # noqa: BLE001 - timeouts, dead actors and engine errors all mean "not healthy"
            return False

    async def _restart(self, slot: _Slot, old: Any) -> None:
        """Replace a dead server with a fresh one from the same spec; retried at the next health check if it fails."""
        if self.kill_server is not None:
            try:
                self.kill_server(old)
            except Exception:  # noqa: BLE001 - it is usually dead already
                pass
        try:
            new = self.make_server(slot.index)
        except Exception as error:  # noqa: BLE001
            self.counters["restart_failures"] += 1
            logger.error("could not create simulator server %d: %s", slot.index, error)
            return
        started, new = await self._started(slot.index, new)
        if started:
            slot.handle, slot.alive = new, True
            slot.restarts += 1
            self.counters["restarts"] += 1
            logger.warning("simulator server %d restarted", slot.index)
        else:
            self.counters["restart_failures"] += 1
            slot.handle = new  # dead or stuck: the next health check kills it and tries again
            logger.error("restarted simulator server %d did not become healthy", slot.index)

    async def _started(self, index: int, new: Any) -> tuple[bool, Any]:
        """Wait, up to ``startup_timeout_s``, for a restarted server to answer its health check; returns whether it
        did, and the server. One waiting for a node the cluster has lost is replaced by one placed anew
        (``stranded``) rather than waited on to the end."""
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if await self._healthy(new, timeout=min(left, self.cfg.health_timeout_s)):
                return True, new
            if self.stranded is not None and self.kill_server is not None and self.stranded(new):
                logger.warning("simulator server %d was waiting for a lost node; placing it again", index)
                self.kill_server(new)
                new = self.make_server(index)
        return False, new

    async def check_health(self) -> dict[int, bool]:
        """Check every live server, restart the ones that fail, and retry restarts that failed before."""
        results = {}
        for slot in self.slots:
            restarting = slot.restart_task is not None and not slot.restart_task.done()
            if restarting:
                results[slot.index] = False
                continue
            handle = slot.handle
            ok = slot.alive and await self._healthy(handle)
            if not ok:
                self.mark_dead(slot, handle, "health check failed", force=True)
            results[slot.index] = ok
        return results

    async def health_loop(self) -> None:
        if self.cfg.health_check_interval_s <= 0:
            return
        while True:
            await asyncio.sleep(self.cfg.health_check_interval_s)
            try:
                await self.check_health()
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad check
                logger.exception("simulator health check failed")

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every server answers a health check (model loaded); raise TimeoutError otherwise."""
        timeout = timeout or self.cfg.startup_timeout_s
        checks = [asyncio.wait_for(_awaitable(s.handle.health()), timeout) for s in self.slots]
        await asyncio.gather(*checks)

    async def close(self) -> None:
        """Finish the background checks and restarts (bounded by their own timeouts)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.cfg.startup_timeout_s)

    # ---- stats ---------------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters since start, latency percentiles over the recent window, and the state of each server."""
        latencies = np.asarray(self.latencies, dtype=np.float64)
        p50, p95 = (float(np.percentile(latencies, q)) for q in (50, 95)) if latencies.size else (0.0, 0.0)
        return {
            **self.counters,
            "latency_p50_s": p50,
            "latency_p95_s": p95,
            "outstanding": sum(s.outstanding for s in self.slots),
            "servers_alive": sum(s.alive for s in self.slots),
            "servers": [{"index": s.index, "alive": s.alive, "outstanding": s.outstanding, "calls": s.calls,
                         "failures": s.failures, "restarts": s.restarts} for s in self.slots],
        }

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


async def _awaitable(value: Any) -> Any:
    """Await a coroutine, future or Ray ObjectRef alike (``wait_for`` then cancels it cleanly on timeout)."""
    return await value
