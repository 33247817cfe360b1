"""A data-parallel group of learner actors, driven as one learner.

The driver calls ``train_step(samples)`` on the group; the group shards the batch across ranks (balanced by tokens),
and each rank's core all-reduces the global token count, so the update equals one learner's on the whole batch.
Every remote call has a timeout: a hung rank fails the step instead of stalling the run.
"""

from __future__ import annotations

from collections.abc import Sequence

import ray

from learners.batch import LearnerSample
from learners.config import LearnerConfig, mini_batches

DEFAULT_TIMEOUT_S = 900.0
# Rank 0 names a port that was free when it asked, and binds it only when the group rendezvous. Any socket of the
# machine may take the port in between (an outbound connection's local port comes from the same range): a 20-step
# experiment arm once died so at its first start. A group whose rendezvous found its port taken starts again.
SETUP_ATTEMPTS = 3


def shard_by_tokens(lengths: Sequence[int], num_shards: int) -> list[list[int]]:
    """Indices per shard: longest first onto the lightest shard, so ranks get similar work. Each shard keeps input
    order. Needs at least one sample per shard (a rank without data cannot join the collectives meaningfully)."""
    if len(lengths) < num_shards:
        raise ValueError(f"{len(lengths)} samples cannot feed {num_shards} data-parallel learners")
    loads = [0] * num_shards
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = min(range(num_shards), key=lambda k: (loads[k], len(shards[k])))
        shards[k].append(i)
        loads[k] += lengths[i]
    return [sorted(s) for s in shards]


def port_was_taken(err: BaseException) -> bool:
    """Whether a group's setup failed because its rendezvous port was in use (torch's ``DistNetworkError``)."""
    return "EADDRINUSE" in str(err)


class LearnerGroup:
    """``num_learners`` Ray actors of ``actor_cls`` (a ``learners.shell.LearnerActor``) forming one DeepSpeed
    group."""

    def __init__(self, actor_cls, num_learners: int, model_path: str, cfg: LearnerConfig, num_cpus: float = 1,
                 num_gpus: float = 0, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self.cfg = cfg
        for attempt in range(1, SETUP_ATTEMPTS + 1):
            self.actors = [ray.remote(actor_cls).options(num_cpus=num_cpus, num_gpus=num_gpus).remote(
                rank, num_learners) for rank in range(num_learners)]
            addr, port = ray.get(self.actors[0].master_address.remote(), timeout=timeout_s)
            try:
                self._get([a.setup.remote(addr, port, str(model_path), cfg) for a in self.actors])
                return
            except ray.exceptions.RayTaskError as err:
                if not port_was_taken(err) or attempt == SETUP_ATTEMPTS:
                    raise
                # Fresh actors: the other ranks may still be waiting on the dead rendezvous.
                self.shutdown()
                print(f"learners: the rendezvous port {port} was taken before rank 0 bound it; starting the "
                      f"{actor_cls.__name__} group again (attempt {attempt + 1} of {SETUP_ATTEMPTS})", flush=True)

    def _get(self, refs):
        return ray.get(refs, timeout=self.timeout_s)

    def _shards(self, samples: Sequence[LearnerSample]) -> list[list[int]]:
        return shard_by_tokens([len(s.input_ids) for s in samples], len(self.actors))

    def train_step(self, samples: Sequence[LearnerSample]) -> dict[str, float]:
        """One update over the whole batch; the metrics are global (identical on every rank), rank 0's are returned.

        The batch is cut into the global mini-batches first (``mini_batch_size``), and each mini-batch is sharded over
        the ranks, so an optimizer step sees the same trajectories however many learners there are."""
        ranks = len(self.actors)
        local: list[list[LearnerSample]] = [[] for _ in range(ranks)]
        local_batches: list[list[list[int]]] = [[] for _ in range(ranks)]
        for batch in mini_batches(len(samples), self.cfg.mini_batch_size):
            members = [samples[i] for i in batch]
            if len(members) < ranks:
                raise ValueError(f"a mini-batch of {len(members)} trajectories cannot feed {ranks} data-parallel "
                                 f"learners: raise learner.mini_batch_size or the batch (train.prompts_per_step x "
                                 f"train.group_size), or use fewer cluster.learners")
            for rank, idx in enumerate(self._shards(members)):
                local_batches[rank].append(list(range(len(local[rank]), len(local[rank]) + len(idx))))
                local[rank].extend(members[i] for i in idx)
        results = self._get([a.train_step.remote(local[r], local_batches[r]) for r, a in enumerate(self.actors)])
        return results[0]

    def logprobs(self, samples: Sequence[LearnerSample]) -> list[list[float]]:
        return self._per_token("logprobs", samples)

    def values(self, samples: Sequence[LearnerSample]) -> list[list[float]]:
        """The critic's V_t per response token (a group of ``CriticActor``s)."""
        return self._per_token("values", samples)

    def _per_token(self, method: str, samples: Sequence[LearnerSample]) -> list[list[float]]:
        """Shard the samples over the ranks, call ``method`` on each, and put the rows back in input order.

        Fewer samples than ranks (the weight-sync canary is one): the idle ranks compute a copy of the first sample,
        whose rows are dropped, so that ranks whose forwards are collective (ZeRO-3) still run in step."""
        if len(samples) < len(self.actors):
            shards = [[i] for i in range(len(samples))] + [[]] * (len(self.actors) - len(samples))
            parts = self._get([getattr(a, method).remote([samples[idx[0] if idx else 0]])
                               for a, idx in zip(self.actors, shards)])
            return [part[0] for idx, part in zip(shards, parts) if idx]
        shards = self._shards(samples)
        parts = self._get([getattr(a, method).remote([samples[i] for i in idx])
                           for a, idx in zip(self.actors, shards)])
        out: list[list[float]] = [[] for _ in samples]
        for idx, part in zip(shards, parts):
            for i, row in zip(idx, part):
                out[i] = row
        return out

    def publish_weights(self, directory: str, version: int) -> str:
        return self._get([a.publish_weights.remote(str(directory), version) for a in self.actors])[0]

    def published_checksum(self) -> float | None:
        """``weights_checksum`` of the weights rank 0 last published (what every engine should report loading)."""
        return self._get(self.actors[0].published_checksum.remote())

    def open_weight_group(self, *args) -> list:
        """Start every rank joining the broadcast group; returns the refs, to be awaited with the engines' joins."""
        return [a.open_weight_group.remote(*args) for a in self.actors]

    def weight_manifest(self) -> dict:
        return self._get(self.actors[0].weight_manifest.remote())

    def broadcast_weights(self, manifest: dict) -> list:
        """Start the broadcast on every rank; returns the refs, to be awaited with the engines' receives."""
        return [a.broadcast_weights.remote(manifest) for a in self.actors]

    def rendezvous_address(self) -> tuple[str, int]:
        return self._get(self.actors[0].master_address.remote())

    def save_checkpoint(self, directory: str) -> str:
        return self._get([a.save_checkpoint.remote(str(directory)) for a in self.actors])[0]

    def load_checkpoint(self, directory: str) -> None:
        self._get([a.load_checkpoint.remote(str(directory)) for a in self.actors])

    def export_hf(self, directory: str) -> str:
        return self._get([a.export_hf.remote(str(directory)) for a in self.actors])[0]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
