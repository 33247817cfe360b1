"""``LearnerGroup`` start-up on real Ray and a real gloo rendezvous: a rendezvous port taken by another socket before
rank 0 binds it starts the group again, on fresh actors and a fresh port."""

from __future__ import annotations

import socket

import pytest


class _NoModel:
    """A learner core that loads nothing: the test is about the group's rendezvous, not the model."""

    def __init__(self, model_path: str, cfg) -> None:
        self.model_path = model_path


@pytest.mark.slow
def test_a_taken_rendezvous_port_starts_the_group_again_on_a_free_one(ray_local, tmp_path):
    import torch.distributed as dist

    from learners.config import LearnerConfig
    from learners.group import LearnerGroup
    from learners.shell import LearnerActor

    taken = socket.socket()  # what another process's socket does between rank 0 naming the port and binding it
    taken.bind(("", 0))
    taken.listen()
    taken_port = taken.getsockname()[1]
    asked = tmp_path / "ports-asked"  # one line per group started: the port its rank 0 named

    class FirstPortTaken(LearnerActor):
        core_cls = _NoModel

        def master_address(self):
            first = not asked.exists()
            address = ("127.0.0.1", taken_port) if first else super().master_address()
            with asked.open("a") as f:
                f.write(f"{address[1]}\n")
            return address

        def world(self) -> tuple[int, int]:
            return dist.get_rank(), dist.get_world_size()

    try:
        group = LearnerGroup(FirstPortTaken, 2, "no-model", LearnerConfig(), num_cpus=1, timeout_s=300)
    finally:
        taken.close()
    try:
        ports = [int(line) for line in asked.read_text().splitlines()]
        assert len(ports) == 2 and ports[0] == taken_port != ports[1]  # one failed start, one good one
        assert ray_local.get([a.world.remote() for a in group.actors], timeout=60) == [(0, 2), (1, 2)]
    finally:
        group.shutdown()
