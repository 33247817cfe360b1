"""Weight sync: the learners publish a new version, every policy engine loads it in place, and two checks confirm it.

``cluster.weight_sync=file`` writes a safetensors file (in shared memory when the machine has it) that each engine
loads; ``gloo`` and ``nccl`` broadcast the tensors from learner rank 0 to every engine worker over a process group
opened once at start-up. After each sync, every engine must report the published version and weights checksum, and
its logprobs on a fixed canary text must agree with the learner's within ``train.canary_tolerance``.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path


class CanaryError(RuntimeError):
    """The engines' logprobs disagree with the learner's after a weight sync."""


class WeightSyncError(RuntimeError):
    """An engine does not serve the version (or the weights) the learners just published."""


class WeightSync:
    """Publish, load and check the policy's weights between the learner group and the rollout engines."""

    def __init__(self, cfg, learners, engines: list, canary_ids: list[int], run_dir: Path) -> None:
        self.cfg = cfg
        self.learners = learners
        self.engines = engines
        self.canary_ids = canary_ids
        self.weights_dir = weights_dir(run_dir)
        self.manifest = self._open_group() if cfg.cluster.weight_sync != "file" else None
        self.published: tuple[str, int] | None = None  # (path, version) of the file the engines last loaded
        self.version = 0  # what the engines served after the last sync that passed its checks (0: the start)

    def _open_group(self) -> dict:
        """Learner rank 0 and every engine worker join one broadcast group; the engines check what they will get."""
        import ray

        from learners.weight_broadcast import group_layout

        c, timeout = self.cfg.cluster, self.cfg.train.sync_timeout_s
        offsets, world = group_layout([c.rollout_tensor_parallel] * len(self.engines))
        addr, port = self.learners.rendezvous_address()
        wire_dtype = None if self.cfg.model.dtype == "auto" else self.cfg.model.dtype  # what the engines serve
        refs = self.learners.open_weight_group(addr, port, world, c.weight_sync, timeout,
                                               c.weight_sync_bucket_mb * 2**20, wire_dtype)
        refs += [e.init_weight_group.remote(addr, port, offset, world, c.weight_sync, timeout)
                 for e, offset in zip(self.engines, offsets)]
        ray.get(refs, timeout=timeout + 60)
        manifest = self.learners.weight_manifest()
        ray.get([e.check_weights.remote(manifest, timeout) for e in self.engines], timeout=timeout + 30)
        return manifest

    def sync(self, version: int) -> dict[str, float]:
        """Publish, load in every engine, then compare engine and learner logprobs on fixed tokens."""
        import ray

        from learners.batch import LearnerSample

        timeout = self.cfg.train.sync_timeout_s
        before = ray.get(self.engines[0].prompt_logprobs.remote(self.canary_ids), timeout=timeout)
        started = time.perf_counter()
        if self.manifest is None:  # weight_sync=file
            path = self.learners.publish_weights(str(self.weights_dir), version)
            ray.get([e.load_weights.remote(path, version, timeout) for e in self.engines], timeout=timeout)
            remove_older_weights(self.weights_dir, keep=path)
            self.published = (path, version)
            published = self.learners.published_checksum()
        else:  # learners send while engines receive; neither side finishes alone
            bucket_bytes = self.cfg.cluster.weight_sync_bucket_mb * 2**20
            sends = self.learners.broadcast_weights(self.manifest)
            results = ray.get(sends + [e.receive_weights.remote(self.manifest, bucket_bytes, version, timeout)
                                       for e in self.engines], timeout=timeout)
            published = results[0]["checksum"]  # learner rank 0 sent it
        elapsed = time.perf_counter() - started
        self.check_loaded(version, published)
        canary = LearnerSample(input_ids=self.canary_ids, prompt_len=1, loss_mask=[1] * (len(self.canary_ids) - 1))
        [learner_lp] = self.learners.logprobs([canary])
        engine_lps = ray.get([e.prompt_logprobs.remote(self.canary_ids) for e in self.engines], timeout=timeout)
        gaps = [mean_abs_gap(lp, learner_lp) for lp in engine_lps]
        gap = max(gaps)
        if gap > self.cfg.train.canary_tolerance:
            worst = gaps.index(gap)
            raise CanaryError(f"after syncing version {version} (the previous was {self.version}), rollout engine "
                              f"{worst} of {len(self.engines)} and the learner differ by {gap:.4f} nats/token on the "
                              f"canary text (train.canary_tolerance={self.cfg.train.canary_tolerance}): the engine "
                              f"does not serve the weights that were trained. The run stops before the next update")
        self.version = version
        return {"timing_s/sync": elapsed, "sync/canary_gap": gap, "sync/canary_moved": mean_abs_gap(before,
                                                                                                     engine_lps[0])}

    def restore(self, engine) -> None:
        """Give a restarted engine the weights the others serve (it starts from the initial policy)."""
        import ray

        if self.manifest is not None:
            raise RuntimeError(f"a restarted rollout engine cannot rejoin the weight broadcast group (cluster."
                               f"weight_sync={self.cfg.cluster.weight_sync}); the run stops. Use cluster.weight_sync="
                               f"file for runs that must survive an engine's death, or resume=auto from the last "
                               f"checkpoint")
        if self.published is not None:
            path, version = self.published
            timeout = self.cfg.train.sync_timeout_s
            ray.get(engine.load_weights.remote(path, version, timeout), timeout=timeout)

    def check_loaded(self, version: int, published: float) -> None:
        """Every engine reports serving ``version``, and the checksum of what it loaded equals the learner's.

        The canary alone cannot tell: at the paper's lr 1e-6 an update moves logprobs far less than its tolerance,
        so an engine left on the previous weights would pass it."""
        import ray

        states = ray.get([e.weights_state.remote() for e in self.engines], timeout=self.cfg.train.sync_timeout_s)
        for k, state in enumerate(states):
            same_sum = state["checksum"] is not None and math.isclose(state["checksum"], published, rel_tol=1e-9)
            if state["version"] != version or not same_sum:
                raise WeightSyncError(
                    f"rollout engine {k} of {len(self.engines)} serves policy version {state['version']} with weights "
                    f"checksum {state['checksum']}, but the learners published version {version} with checksum "
                    f"{published}: the engine did not load the new weights (cluster.weight_sync="
                    f"{self.cfg.cluster.weight_sync})")

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.weights_dir, ignore_errors=True)


def weights_dir(run_dir: Path) -> Path:
    """Shared memory when the machine has it: the engines read each new version without touching the disk."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else run_dir
    folder = base / f"zerosearch-ray-weights-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def mean_abs_gap(a: list[float], b: list[float]) -> float:
    return statistics.fmean(abs(x - y) for x, y in zip(a, b))


def remove_older_weights(folder: Path, keep: str) -> None:
    for path in folder.glob("*.safetensors"):
        if str(path) != keep:
            path.unlink(missing_ok=True)
