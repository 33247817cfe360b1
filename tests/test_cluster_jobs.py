"""The driver as a cluster runs it: submitted to a running Ray cluster with `ray job submit`. (Swept by Hydra:
``tests/test_train_e2e.py``, whose sweep also trains each job to a learnable reward.)

It runs the tiny end-to-end job for one step. The cluster is a private `ray start --head` on free ports with a temp
dir of its own; `ray stop` would stop every Ray instance on the machine, so the test ends its own processes instead.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

GUIDED_SEARCH = "<search> [a-z]{2,8} [a-z]{2,8} </search>"
# The end-to-end tests' tiny run (tests/test_train_e2e.py), one step, nothing written that the test does not check.
TINY_RUN = [
    "model=tiny_llama", "learner=tiny", "simulator=tiny", "train.total_steps=1", "train.prompts_per_step=2",
    "train.group_size=2", "rollout.episode.max_tokens_per_turn=24", "rollout.episode.max_obs_tokens=96",
    f"rollout.guided_first_turn_regex='{GUIDED_SEARCH}'", "data.synthetic_entities=32", "logger.wandb.mode=disabled",
    "train.warmup=off", "train.throughput_probe=false", "train.export_hf=false",
]
RAY = str(Path(sys.executable).parent / "ray")


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _processes_with(marker: bytes) -> list[int]:
    """Processes whose environment holds ``marker``: everything the cluster started, whatever its session."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    pids.append(int(entry))
            except OSError:  # gone, or not ours to read
                pass
    return pids


class LocalCluster:
    """``ray start --head --block`` in a session of its own; every process it starts inherits a unique marker in its
    environment (job drivers run in sessions of their own, so a process group would miss them)."""

    def __init__(self, num_cpus: int = 4, env: dict[str, str] | None = None) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit 107 bytes
        self.nodes: list[tuple[subprocess.Popen, str]] = []  # worker nodes: `ray start --address`, and their marker
        gcs, dashboard, client, agent_listen, agent_grpc, metrics, runtime_env, node_manager, object_manager = \
            _free_ports(9)
        self.dashboard_url = f"http://127.0.0.1:{dashboard}"
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.marker = f"ZEROSEARCH_RAY_TEST_CLUSTER={uuid.uuid4().hex}"
        env = {**os.environ, self.marker.split("=")[0]: self.marker.split("=")[1],
               # `python` in a job's entrypoint is this interpreter, as on a cluster set up with `make setup`
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "RAY_USAGE_STATS_ENABLED": "0",
               # Ray authenticates clients by token; one of its own keeps the test clear of any token in the home
               # folder, and the CLI calls and the job's driver get it from this environment.
               "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), **(env or {})}
        cmd = [RAY, "start", "--head", "--block", f"--num-cpus={num_cpus}", "--num-gpus=0",
               f"--temp-dir={self.temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--port={gcs}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
               f"--dashboard-agent-listen-port={agent_listen}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
               f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
               "--object-store-memory=500000000", "--disable-usage-stats"]
        self.log = open(Path(self.temp_dir) / "ray_start.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.env = env

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"ray start exited: {self.log_tail()}"
            listed = subprocess.run([RAY, "job", "list", f"--address={self.dashboard_url}"], env=self.env,
                                    capture_output=True, text=True, timeout=60)
            if listed.returncode == 0:
                return
            time.sleep(2)
        raise TimeoutError(f"the job server did not answer within {timeout}s: {self.log_tail()}")

    def add_node(self, num_cpus: int, resources: dict[str, float]) -> str:
        """A second node on this machine (``ray start --address --block``, its own ports and marker); returns the
        marker, which ``kill_node`` uses to take the node away."""
        agent_listen, agent_grpc, metrics, runtime_env, node_manager, object_manager = _free_ports(6)
        marker = f"ZEROSEARCH_RAY_TEST_NODE={uuid.uuid4().hex}"
        env = {**self.env, marker.split("=")[0]: marker.split("=")[1]}
        cmd = [RAY, "start", f"--address={self.gcs_address}", "--block", f"--num-cpus={num_cpus}", "--num-gpus=0",
               f"--resources={json.dumps(resources)}", f"--dashboard-agent-listen-port={agent_listen}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
               f"--runtime-env-agent-port={runtime_env}", f"--node-manager-port={node_manager}",
               f"--object-manager-port={object_manager}", "--object-store-memory=300000000", "--disable-usage-stats"]
        proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append((proc, marker))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # joined once the cluster's resources list the node's own
            assert proc.poll() is None, f"ray start --address exited: {self.log_tail()}"
            status = self.ray("status", f"--address={self.gcs_address}", timeout=60)
            if all(name in status.stdout for name in resources):
                return marker
            time.sleep(1)
        raise TimeoutError(f"the second node did not join within 120s: {self.log_tail()}")

    def kill_node(self, marker: str) -> int:
        """SIGKILL every process of one worker node, as a machine that lost power; returns how many there were."""
        pids = _processes_with(marker.encode())
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def ray(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], cwd=REPO_ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def log_tail(self) -> str:
        return (Path(self.temp_dir) / "ray_start.log").read_text()[-3000:]

    def stop(self) -> None:
        """``ray start --block`` stops its cluster on SIGTERM (in seconds); whatever outlives it is killed."""
        for _, node_marker in self.nodes:
            self.kill_node(node_marker)
        marker = self.marker.encode()
        for pids, sig, grace in (([self.proc.pid], signal.SIGTERM, 30.0), (None, signal.SIGKILL, 5.0)):
            for pid in pids or [self.proc.pid, *_processes_with(marker)]:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and (self.proc.poll() is None or _processes_with(marker)):
                time.sleep(0.5)
        self.log.close()
        assert self.proc.poll() is not None and not _processes_with(marker), "the test cluster outlived stop()"
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def ray_cluster():
    cluster = LocalCluster()
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ray_job_submit_runs_the_driver_on_a_running_cluster(ray_cluster, tmp_path):
    run_dir, job_id = tmp_path / "run", f"zerosearch-test-{uuid.uuid4().hex[:8]}"
    # Paths on storage the cluster sees: the job itself runs in an uploaded copy of the working dir.
    # Real BM25, not a simulator server: the test is about submission, and one fewer vLLM engine saves half a minute.
    entrypoint = ["python", "-m", "launch.train", *TINY_RUN, "search=bm25", "cluster.address=auto",
                  f"data.dir={tmp_path / 'world'}", f"hydra.run.dir={run_dir}"]
    submitted = ray_cluster.ray("job", "submit", f"--address={ray_cluster.dashboard_url}",
                                f"--submission-id={job_id}", "--working-dir", ".", "--", *entrypoint)
    output = submitted.stdout[-4000:] + submitted.stderr[-4000:]
    assert submitted.returncode == 0, output
    status = ray_cluster.ray("job", "status", f"--address={ray_cluster.dashboard_url}", job_id, timeout=60)
    status_text = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)  # drop the colours
    assert f"Job '{job_id}' succeeded" in status_text, status_text + output

    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1]
    assert rows[0]["search/calls_per_episode"] >= 1.0 and rows[0]["critic/score/mean"] >= 0.0
    assert (run_dir / "summary.json").is_file()
    # The driver joined the submitted-to cluster rather than starting a Ray of its own.
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["cluster"]["address"] == "auto"

    # The uploaded copy is the source alone: no virtualenv, runs, data, caches or git history.
    packages = Path(ray_cluster.temp_dir, "session_latest", "runtime_resources", "working_dir_files")
    [package] = [p for p in packages.glob("_ray_pkg_*") if p.is_dir()]
    uploaded = {p.name for p in package.iterdir()}
    assert {"launch", "conf", "actors", "learners", "simulator", "setup.py"} <= uploaded
    assert not uploaded & {".venv", "runs", "multirun", "outputs", "data", ".git", ".pytest_cache", "wandb"}, uploaded
