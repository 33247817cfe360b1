"""The simulator pool: routing, retries, restarts, cache and counters.

Unit tests drive the pure async core (``SimulatorPool``) with fake servers; a fake is fine there because the code
under test sits above the servers. The slow tests run the real stack: Ray actors holding vLLM CPU engines (tiny-llama),
plus one test-only server body that never answers, to test the pool's timeouts on real Ray.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from simulator.base import NO_INFORMATION
from simulator.config import SimulatorConfig
from simulator.pool import ServerDead, SimulatorPool


class FakeServer:
    """An in-process server: answers with its own name, optionally after an event, or fails as told."""

    def __init__(self, name: str, fail: Exception | None = None, gate: asyncio.Event | None = None) -> None:
        self.name = name
        self.fail = fail
        self.gate = gate
        self.prompts: list[str] = []
        self.healthy = True

    async def generate(self, prompt, sampling=None):
        self.prompts.append(prompt)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return {"text": f"Doc 1: {self.name} on {prompt}", "num_tokens": 3, "prompt_tokens": 2}

    async def health(self):
        if not self.healthy:
            raise ServerDead(self.name)
        return {"name": self.name}


def _cfg(**overrides) -> SimulatorConfig:
    base = {"model": "fake", "num_servers": 2, "request_timeout_s": 5.0, "max_attempts": 3, "health_timeout_s": 1.0,
            "health_check_interval_s": 0.0}
    return SimulatorConfig(**{**base, **overrides})


def test_routes_to_the_server_with_fewest_outstanding_requests():
    async def main():
        gate = asyncio.Event()
        servers = [FakeServer("a", gate=gate), FakeServer("b", gate=gate), FakeServer("c", gate=gate)]
        pool = SimulatorPool(_cfg(num_servers=3), servers)
        tasks = [asyncio.create_task(pool.generate(f"q{i}")) for i in range(6)]
        await asyncio.sleep(0)  # let every call reach its server
        outstanding = [s["outstanding"] for s in pool.stats()["servers"]]
        gate.set()
        results = await asyncio.gather(*tasks)
        return outstanding, results, servers

    outstanding, results, servers = asyncio.run(main())
    assert outstanding == [2, 2, 2]  # 6 blocked calls over 3 servers: each new call went to a least-loaded one
    assert [len(s.prompts) for s in servers] == [2, 2, 2]
    assert not any(r["failed"] for r in results)


def test_busy_server_is_skipped():
    class SlowOnRequest(FakeServer):
        async def generate(self, prompt, sampling=None):
            if prompt == "slow":
                await self.slow_gate.wait()
            return await FakeServer.generate(self, prompt, sampling)

    async def main():
        gate = asyncio.Event()
        servers = [SlowOnRequest("a"), SlowOnRequest("b")]
        for server in servers:
            server.slow_gate = gate
        pool = SimulatorPool(_cfg(), servers)
        blocked = asyncio.create_task(pool.generate("slow"))
        await asyncio.sleep(0)
        busy = [s["outstanding"] for s in pool.stats()["servers"]].index(1)
        quick = [await pool.generate(f"q{i}") for i in range(4)]  # sequential: the busy one stays at 1 outstanding
        gate.set()
        await blocked
        return busy, quick

    busy, quick = asyncio.run(main())
    assert [(r["server"], r["attempts"]) for r in quick] == [(1 - busy, 1)] * 4


def test_a_failed_attempt_is_retried_on_another_server():
    async def main():
        broken, good = FakeServer("broken", fail=RuntimeError("engine error")), FakeServer("good")
        pool = SimulatorPool(_cfg(), [broken, good])
        results = [await pool.generate(f"q{i}") for i in range(6)]
        return results, pool.stats(), broken

    results, stats, broken = asyncio.run(main())
    assert all(not r["failed"] and r["server"] == 1 for r in results)
    retried = [r for r in results if r["attempts"] == 2]
    assert retried and len(retried) == len(broken.prompts) == stats["retries"]  # each failure moved to the other
    assert stats["failures"] == 0 and stats["errors"] == len(broken.prompts)
    assert stats["servers_alive"] == 2  # an exception inside a live server is not a death


def test_every_attempt_failing_returns_the_fallback_and_counts_a_failure():
    async def main():
        servers = [FakeServer("x", fail=RuntimeError("boom")), FakeServer("y", fail=RuntimeError("boom"))]
        pool = SimulatorPool(_cfg(max_attempts=3), servers)
        return await pool.generate("q"), pool.stats()

    result, stats = asyncio.run(main())
    assert result["failed"] and result["text"] == NO_INFORMATION and result["attempts"] == 3
    assert "boom" in result["error"]
    assert stats["failures"] == 1 and stats["ok"] == 0 and stats["calls"] == 1


def test_a_bad_request_is_not_retried():
    async def main():
        servers = [FakeServer(name, fail=ValueError("prompt too long")) for name in "xy"]
        pool = SimulatorPool(_cfg(max_attempts=3), servers)
        return await pool.generate("q"), pool.stats()

    result, stats = asyncio.run(main())
    assert result["failed"] and result["attempts"] == 1 and "prompt too long" in result["error"]
    assert stats["failures"] == 1 and stats["retries"] == 0 and stats["servers_alive"] == 2


def test_a_hung_server_times_out_into_the_fallback():
    async def main():
        never = asyncio.Event()
        pool = SimulatorPool(_cfg(num_servers=1, request_timeout_s=0.05, max_attempts=2), [FakeServer("h", gate=never)])
        result = await pool.generate("q")
        await pool.close()  # lets the health checks that followed the timeouts finish
        return result, pool.stats()

    result, stats = asyncio.run(main())
    assert result["failed"] and result["text"] == NO_INFORMATION
    assert stats["timeouts"] == 2 and stats["failures"] == 1
    assert stats["servers_alive"] == 1  # it still answers health checks: slow, not dead, so not restarted


def test_a_dead_server_is_restarted_once_and_used_again():
    async def main():
        made: list[FakeServer] = []

        def make_server(index: int) -> FakeServer:
            made.append(FakeServer(f"new{index}"))
            return made[-1]

        dead = FakeServer("dead", fail=ServerDead("gone"))
        dead.healthy = False
        pool = SimulatorPool(_cfg(), [dead, FakeServer("b")], make_server=make_server)
        first = await asyncio.gather(*(pool.generate(f"q{i}") for i in range(4)))
        await asyncio.gather(*(s.restart_task for s in pool.slots if s.restart_task))
        later = await asyncio.gather(*(pool.generate(f"later{i}") for i in range(4)))
        return first, later, pool.stats(), made

    first, later, stats, made = asyncio.run(main())
    assert not any(r["failed"] for r in first + later)
    assert stats["restarts"] == 1 and len(made) == 1  # several calls saw the death; one restart
    assert any(r["server"] == 0 for r in later) and made[0].prompts


class NeverPlaced(FakeServer):
    """A server waiting for a node that is gone: its health check never returns."""

    async def health(self):
        await asyncio.Event().wait()


def test_a_restart_waiting_for_a_lost_node_is_placed_again_instead_of_waited_on():
    async def main():
        made, killed = [], []

        def make_server(index: int) -> FakeServer:
            # The first replacement still asks for the lost simulation node; the second is placed anywhere.
            made.append(NeverPlaced("pinned") if not made else FakeServer(f"anywhere{index}"))
            return made[-1]

        dead = FakeServer("dead", fail=ServerDead("node lost"))
        dead.healthy = False
        pool = SimulatorPool(_cfg(num_servers=1, startup_timeout_s=60.0), [dead], make_server=make_server,
                             kill_server=killed.append, stranded=lambda h: isinstance(h, NeverPlaced))
        started = time.perf_counter()
        first = await pool.generate("q")
        await asyncio.gather(*(s.restart_task for s in pool.slots if s.restart_task))
        waited = time.perf_counter() - started
        later = await pool.generate("later")
        return first, later, pool.stats(), made, killed, waited

    first, later, stats, made, killed, waited = asyncio.run(main())
    # The only server was gone: the call waited for the restart (bounded by request_timeout_s) and was served by it.
    assert not first["failed"] and first["text"].startswith("Doc 1: anywhere0")
    assert [type(m) for m in made] == [NeverPlaced, FakeServer] and made[0] in killed
    assert waited < 10  # one health timeout (1 s) for the stranded one, not the 60 s start-up limit
    assert not later["failed"] and later["text"].startswith("Doc 1: anywhere0")
    assert stats["restarts"] == 1 and stats["servers_alive"] == 1


def test_cache_hits_on_a_repeated_key_and_keys_include_the_version():
    async def main():
        server = FakeServer("s")
        pool = SimulatorPool(_cfg(num_servers=1, cache_size=2, version="v1"), [server])
        key = ("query", True, "question", "answer")
        a = await pool.generate("prompt", cache_key=key)
        b = await pool.generate("prompt", cache_key=key)
        c = await pool.generate("prompt", cache_key=("query", False, "question", "answer"))
        d = await pool.generate("prompt")  # no key: never cached
        e = await pool.generate("prompt")
        return [a, b, c, d, e], pool.stats(), server

    (a, b, c, d, e), stats, server = asyncio.run(main())
    assert not a["cache_hit"] and b["cache_hit"] and b["text"] == a["text"]
    assert not c["cache_hit"] and not d["cache_hit"] and not e["cache_hit"]
    assert stats["cache_hits"] == 1 and len(server.prompts) == 4 and stats["calls"] == 5


def test_lru_cache_evicts_the_oldest_key():
    async def main():
        pool = SimulatorPool(_cfg(num_servers=1, cache_size=2), [FakeServer("s")])
        server = pool.slots[0].handle
        for key in ["a", "b", "a", "c", "a", "b"]:  # c evicts b, the least recently used; a stays
            await pool.generate(key, cache_key=key)
        return pool.stats(), server.prompts

    stats, prompts = asyncio.run(main())
    assert stats["cache_hits"] == 2 and prompts == ["a", "b", "c", "b"]


def test_latency_percentiles_and_counters():
    pool = SimulatorPool(_cfg(num_servers=1), [FakeServer("s")])
    assert pool.stats()["latency_p50_s"] == 0.0  # no calls yet
    pool.latencies.extend(float(x) for x in range(1, 101))
    stats = pool.stats()
    assert stats["latency_p50_s"] == pytest.approx(np.percentile(np.arange(1, 101), 50)) == pytest.approx(50.5)
    assert stats["latency_p95_s"] == pytest.approx(95.05)

    async def main():
        await pool.generate("x")
        return pool.stats()

    stats = asyncio.run(main())
    assert stats["calls"] == 1 and stats["tokens"] == 3 and stats["prompt_tokens"] == 2 and stats["ok"] == 1


def test_server_formats_the_spec_messages_with_the_chat_template(tokenizer):
    from simulator.server import chat_prompt_ids, simulator_messages

    assert simulator_messages("P") == [{"role": "system", "content": ""}, {"role": "user", "content": "P"}]
    listed = [{"role": "user", "content": [{"type": "text", "text": "P"}]}]
    assert simulator_messages(listed) == [{"role": "user", "content": "P"}]
    text = tokenizer.decode(chat_prompt_ids(tokenizer, "Query: x\nUseful Output:\n"))
    assert text == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nQuery: x\nUseful Output:\n<|im_end|>\n" \
                   "<|im_start|>assistant\n"  # empty system turn, no default one


def test_server_sampling_defaults_overrides_and_cpu_binding():
    from simulator.server import cpu_threads_bind, sampling_kwargs

    cfg = SimulatorConfig(model="m", num_servers=2)
    assert sampling_kwargs(cfg) == {"temperature": 0.8, "top_p": 1.0, "max_tokens": 600}
    assert sampling_kwargs(cfg, {"max_tokens": 16, "seed": None}) == {"temperature": 0.8, "top_p": 1.0,
                                                                       "max_tokens": 16}
    with pytest.raises(ValueError, match="unsupported sampling option"):
        sampling_kwargs(cfg, {"best_of": 2})
    assert [cpu_threads_bind(cfg, i, cores=[0, 1, 2, 3]) for i in range(2)] == ["0,1", "2,3"]
    assert cpu_threads_bind(SimulatorConfig(model="m"), 0, cores=[0, 1]) == "0,1"
    assert cpu_threads_bind(SimulatorConfig(model="m", num_servers=3), 2, cores=[0, 1]) == "0"
    assert cpu_threads_bind(SimulatorConfig(model="m", cpu_threads_bind="auto"), 0) == "auto"
    one_each = SimulatorConfig(model="m", num_servers=2, cpu_threads=1)
    assert [cpu_threads_bind(one_each, i, cores=[0, 1, 2, 3]) for i in range(2)] == ["1", "3"]
    assert cpu_threads_bind(SimulatorConfig(model="m", cpu_threads=1), 0, cores=[0, 1]) == "1"


def test_cpu_engine_env_binds_one_engine_process_to_the_servers_cores():
    from simulator.server import cpu_engine_env

    env = cpu_engine_env(SimulatorConfig(model="m", num_servers=2, kvcache_gb=2), 1, cores=[0, 1, 2, 3])
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "2",
                   "OMP_PLACES": "{2,3}", "OMP_PROC_BIND": "true"}
    ranged = cpu_engine_env(SimulatorConfig(model="m", cpu_threads_bind="4-6,9"), 0)
    assert (ranged["OMP_NUM_THREADS"], ranged["OMP_PLACES"]) == ("4", "{4,5,6,9}")
    assert "OMP_PLACES" not in cpu_engine_env(SimulatorConfig(model="m", cpu_threads_bind="nobind"), 0)
    with pytest.raises(ValueError, match="simulator.cpu_threads_bind: 'x' is not a core id"):
        cpu_engine_env(SimulatorConfig(model="m", cpu_threads_bind="0,x"), 0)


# ---------------------------------------------------------------------------------------------------------------------
# Real Ray + vLLM
# ---------------------------------------------------------------------------------------------------------------------


class NeverAnswers:
    """A test-only server body: healthy, but its generate never returns. A stand-in above which the pool is tested."""

    def __init__(self, cfg, index: int = 0) -> None:
        self.index = index

    async def generate(self, prompt, sampling=None):
        await asyncio.sleep(10**9)

    async def health(self):
        return {"index": self.index}


def _wait_until(predicate, limit_s: float = 600.0, every_s: float = 1.0) -> bool:
    """Poll for a state change; a bounded wait, not a timing assertion."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every_s)
    return False


def _tiny_cfg(tiny_llama_path, **overrides) -> SimulatorConfig:
    base = {"model": str(tiny_llama_path), "num_servers": 2, "max_tokens": 48, "max_model_len": 1024,
            "request_timeout_s": 300.0, "max_attempts": 3, "health_check_interval_s": 0.0, "startup_timeout_s": 600.0}
    return SimulatorConfig(**{**base, **overrides})


@pytest.mark.slow
def test_pool_serves_concurrent_calls_and_survives_a_killed_server(ray_local, tiny_llama_path):
    from simulator.pool_actor import create_simulator_pool

    ray = ray_local
    pool = create_simulator_pool(_tiny_cfg(tiny_llama_path))
    try:
        # 32 concurrent calls over 2 servers: all return, both servers work.
        results = ray.get([pool.generate.remote(f"query {i}") for i in range(32)], timeout=900)
        assert len(results) == 32 and not any(r["failed"] for r in results)
        assert {r["server"] for r in results} == {0, 1}
        assert all(r["num_tokens"] > 0 for r in results)

        # Kill server 0 while calls are in flight: no call is lost, and the server comes back.
        victim = ray.get(pool.server_actor.remote(0), timeout=60)
        sampling = {"max_tokens": 200}  # long enough that calls are still running when the kill lands
        refs = [pool.generate.remote(f"second {i}", None, sampling) for i in range(32)]
        assert _wait_until(lambda: ray.get(pool.stats.remote(), timeout=60)["servers"][0]["outstanding"] > 0,
                           every_s=0.2)
        ray.kill(victim, no_restart=True)
        results = ray.get(refs, timeout=900)
        assert not any(r["failed"] for r in results)
        assert _wait_until(lambda: ray.get(pool.stats.remote(), timeout=60)["restarts"] == 1)

        stats = ray.get(pool.stats.remote(), timeout=60)
        assert stats["failures"] == 0 and stats["restarts"] == 1 and stats["servers_alive"] == 2
        later = ray.get([pool.generate.remote(f"later {i}") for i in range(8)], timeout=900)
        assert not any(r["failed"] for r in later)
        assert any(r["server"] == 0 for r in later)  # the restarted server takes calls again
        assert ray.get(pool.stats.remote(), timeout=60)["restarts"] == 1
    finally:
        ray.get(pool.shutdown.remote(), timeout=60)
        ray.kill(pool)


@pytest.mark.slow
def test_a_server_that_never_answers_gives_the_fallback(ray_local):
    from simulator.pool_actor import create_simulator_pool

    ray = ray_local
    cfg = SimulatorConfig(model="unused", num_servers=1, cpus_per_server=0, request_timeout_s=1.0, max_attempts=2,
                          health_check_interval_s=0.0, startup_timeout_s=120.0)
    pool = create_simulator_pool(cfg, server_cls=NeverAnswers)
    try:
        result = ray.get(pool.generate.remote("anything"), timeout=120)
        assert result["failed"] and result["text"] == NO_INFORMATION and "timed out" in result["error"]
        stats = ray.get(pool.stats.remote(), timeout=60)
        assert stats["failures"] == 1 and stats["timeouts"] == 2 and stats["restarts"] == 0
    finally:
        ray.get(pool.shutdown.remote(), timeout=60)
        ray.kill(pool)
