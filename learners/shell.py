"""The Ray side every DeepSpeed learner shares: join the process group, then forward each call to the role's core.

One scheme names every role: a pure core (``PolicyCore``, ``CriticCore``, ``SFTCore``, ``ReferenceCore``,
``RolloutCore``), a thin Ray actor over it (``PolicyActor``, ``CriticActor``, ``SFTActor``, ``ReferenceActor``,
``RolloutActor``), and the driver's handle on a group of them (``LearnerGroup``, ``RolloutGroup``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from learners import distributed as D
from learners.batch import LearnerSample
from learners.config import LearnerConfig
from learners.engine import DeepSpeedCore


class LearnerActor:
    """The Ray side of a learner: joins the process group, then forwards calls to its core.

    Construction is cheap and separate from ``setup`` because the group must first ask rank 0 for an address.
    """

    core_cls: type[DeepSpeedCore] = DeepSpeedCore

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.core: DeepSpeedCore | None = None

    def master_address(self) -> tuple[str, int]:
        """Rank 0's reachable address and a free port, for every rank's rendezvous."""
        return D.node_ip(), D.free_port()

    def setup(self, master_addr: str, master_port: int, model_path: str, cfg: LearnerConfig) -> None:
        D.init_distributed(self.rank, self.world_size, master_addr, master_port)
        D.use_cpu_threads(cfg.cpu_threads, ranks_on_machine=self.world_size)
        self.core = self.core_cls(model_path, cfg)

    def logprobs(self, samples: Sequence[LearnerSample]) -> list[list[float]]:
        return self.core.logprobs(samples)

    def train_step(self, samples: Sequence[LearnerSample], mini_batches: Sequence[Sequence[int]] | None = None
                   ) -> dict[str, float]:
        return self.core.train_step(samples, mini_batches)

    def publish_weights(self, directory: str, version: int) -> str:
        return self.core.publish_weights(directory, version)

    def published_checksum(self) -> float | None:
        return self.core.published_checksum

    def open_weight_group(self, *args) -> None:
        self.core.open_weight_group(*args)

    def weight_manifest(self) -> dict:
        return self.core.weight_manifest()

    def broadcast_weights(self, manifest: dict) -> dict[str, float]:
        return self.core.broadcast_weights(manifest)

    def save_checkpoint(self, directory: str) -> str:
        return self.core.save_checkpoint(directory)

    def load_checkpoint(self, directory: str) -> None:
        self.core.load_checkpoint(directory)

    def export_hf(self, directory: str) -> str:
        return self.core.export_hf(directory)

    def global_step(self) -> int:
        return self.core.global_step

    def pid(self) -> int:
        return os.getpid()
