"""R10: a whole node lost. A two-node Ray cluster on this machine (`ray start --head`, then `ray start --address` with
a `simulator_node` resource of its own); the simulator pool places its server on the second node, which is then
killed, every one of its processes at once. The server must come back on the surviving node, and nothing may hang.

The driver is a process of its own, because this test session already holds a local Ray instance. It runs on the
head node, as a driver does on a real cluster.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT
from tests.test_cluster_jobs import LocalCluster

# Ray declares a silent node dead after health_check_failure_threshold missed checks; a second each keeps this short.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                   "RAY_health_check_failure_threshold": "3"}
REQUEST_TIMEOUT_S, ATTEMPTS = 20.0, 2

DRIVER = """
import json, sys, time
import ray
from simulator.config import SimulatorConfig
from simulator.pool_actor import create_simulator_pool
from simulator.server import live_nodes_offering

ray.init(address=sys.argv[1], log_to_driver=False)
cfg = SimulatorConfig(model=sys.argv[2], num_servers=1, max_tokens=16, max_model_len=1024,
                      placement_resource="simulator_node", request_timeout_s=float(sys.argv[3]),
                      max_attempts=int(sys.argv[4]), health_timeout_s=10.0, health_check_interval_s=2.0,
                      startup_timeout_s=300.0)
head = ray.get_runtime_context().get_node_id()
print("CONNECTED " + json.dumps({"node": head}), flush=True)
deadline = time.monotonic() + 120
while time.monotonic() < deadline and not live_nodes_offering("simulator_node"):
    time.sleep(0.5)
pool = create_simulator_pool(cfg)
server = ray.get(pool.server_actor.remote(0), timeout=60)
before = ray.get(server.health.remote(), timeout=60)["node_id"]
print("PLACED " + json.dumps({"server_node": before, "head": head,
      "router_node": ray.get(pool.stats.remote(), timeout=60)["router_node"],
      "simulator_nodes": live_nodes_offering("simulator_node")}), flush=True)
sys.stdin.readline()  # the test kills the server's node now

started = time.perf_counter()
during = ray.get([pool.generate.remote(f"query {i}") for i in range(4)], timeout=600)
calls_s = time.perf_counter() - started
deadline = time.monotonic() + 300
def back(stats):
    return stats["restarts"] >= 1 and stats["servers_alive"] == 1
while time.monotonic() < deadline and not back(ray.get(pool.stats.remote(), timeout=60)):
    time.sleep(1)
back_s = time.perf_counter() - started
after = ray.get(ray.get(pool.server_actor.remote(0), timeout=60).health.remote(), timeout=60)["node_id"]
later = ray.get([pool.generate.remote(f"later {i}") for i in range(2)], timeout=300)
print("RESULT " + json.dumps({"after_node": after, "calls_s": calls_s, "back_s": back_s,
      "during_failed": sum(r["failed"] for r in during), "later_failed": sum(r["failed"] for r in later),
      "stats": ray.get(pool.stats.remote(), timeout=60)}), flush=True)
ray.get(pool.shutdown.remote(), timeout=60)
"""


def _line(proc: subprocess.Popen, prefix: str, timeout: float) -> dict:
    """The driver's next line that starts with ``prefix``, parsed; fails the test if none comes in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return json.loads(line[len(prefix):])
    proc.kill()
    raise AssertionError(f"the driver gave no {prefix.strip()} line in {timeout:.0f}s: {proc.stderr.read()[-4000:]}")


@pytest.mark.slow
def test_a_lost_simulation_node_moves_its_server_to_the_surviving_node(tiny_llama_path):
    cluster = LocalCluster(num_cpus=2, env=FAST_NODE_DEATH)
    driver = None
    try:
        cluster.wait_ready()
        # The driver first, so that it attaches to the head's raylet: with two nodes on one address, a driver may
        # attach to either, and one on the second node would go down with it.
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER, cluster.gcs_address, str(tiny_llama_path), str(REQUEST_TIMEOUT_S),
             str(ATTEMPTS)],
            cwd=REPO_ROOT, env=cluster.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        _line(driver, "CONNECTED ", timeout=120)
        node = cluster.add_node(num_cpus=1, resources={"simulator_node": 1})
        placed = _line(driver, "PLACED ", timeout=300)
        assert placed["server_node"] in placed["simulator_nodes"]  # pinned to the simulation node
        assert placed["router_node"] == placed["head"] not in placed["simulator_nodes"], placed  # on the driver's

        assert cluster.kill_node(node) > 0
        driver.stdin.write("go\n")
        driver.stdin.flush()
        result = _line(driver, "RESULT ", timeout=600)
        assert driver.wait(timeout=120) == 0, driver.stderr.read()[-4000:]

        # Back on the node that survived, and serving again.
        assert result["after_node"] != placed["server_node"]
        assert result["stats"]["restarts"] >= 1 and result["stats"]["servers_alive"] == 1
        assert result["later_failed"] == 0
        # Nothing hung: the calls made while the node was going returned within the pool's own bound (each attempt
        # at most the request timeout, plus one bounded wait for the restart), answered or as "No information".
        assert result["calls_s"] <= (ATTEMPTS + 1) * REQUEST_TIMEOUT_S + 30, result
        print(f"\nR10: calls during the loss {result['calls_s']:.1f}s ({result['during_failed']} of 4 without "
              f"documents), server back after {result['back_s']:.1f}s, restarts {result['stats']['restarts']}")
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        cluster.stop()
