"""Engine side of the GPU weight sync: every vLLM worker joins learner rank 0's broadcast group and loads the new
weights in place.

Why
---
On a GPU cluster the file path (``actors/weight_loader.py``) costs a host round trip per engine and storage shared by
every node. Instead learner rank 0 broadcasts the weights over NCCL (``learners/weight_broadcast.py``) and each worker
feeds them to vLLM's in-place reload, which calls ``model.load_weights`` between vLLM's layerwise reload hooks (the
same path as the CPU loader, so weights that vLLM post-processes after loading are handled).

Why not vLLM's own ``nccl`` weight-transfer engine (``vllm.distributed.weight_transfer.nccl_engine``), which this
mirrors: it waits on NCCL without a deadline (a learner that dies mid-broadcast hangs every engine for good), it must
be enabled with ``weight_transfer_config`` when the engine starts, and it has no CPU backend to test with. This
extension keeps its wire format and rank layout, so the learner's broadcaster can feed either, and the same vLLM pieces
(``StatelessProcessGroup`` + ``PyNcclCommunicator``, the in-place layerwise reload); it adds a deadline to every step,
checks the published manifest against the checkpoint the engine serves before anything is sent, and runs over gloo on
CPU engines.

Driver sequence (all calls through ``AsyncLLM.collective_rpc``, which runs them on every worker of an engine):

1. once: ``init_weight_group(addr, port, rank_offset, world_size, timeout_s)`` on every engine, concurrently with
   ``WeightBroadcaster.connect`` on learner rank 0; then ``check_policy_weights(manifest)``, before any broadcast;
2. per policy version: ``receive_policy_weights(manifest, bucket_bytes)`` on every engine, concurrently with
   ``WeightBroadcaster.broadcast`` on every learner rank; then reset the prefix cache;
3. at the end: ``close_weight_group()``.

Pure helpers (manifest parsing and checking, the receive loop) are at module level and tested on CPU. The channels,
the bucket plan and the checksum come from the wire both ends share, ``learners/weight_wire.py``: the one module
``actors`` imports from ``learners``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from actors.weight_loader import WeightLoaderExtension
from learners.weight_wire import (  # noqa: F401 - the wire's names are part of this module's interface
    DEFAULT_BUCKET_BYTES,
    DEFAULT_TIMEOUT_S,
    GLOO_STORE_PREFIX,
    dtype_name,
    open_channel,
    plan_buckets,
    weights_checksum,
)

logger = logging.getLogger(__name__)

# The names safetensors headers give dtypes. A checkpoint tensor of another dtype is left out of the expectations.
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# Problems listed in one error; the rest are counted.
_MAX_PROBLEMS_SHOWN = 20


class WeightManifestError(ValueError):
    """The published weights do not match what this engine expects; the message names every parameter at fault."""


@dataclass(frozen=True)
class WeightSpec:
    """One published tensor: its name (as in the HF checkpoint), wire dtype and full shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# ----------------------------------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------------------------------


def parse_manifest(manifest: Mapping[str, Sequence]) -> list[WeightSpec]:
    """``{"names", "dtype_names", "shapes"}`` (parallel lists, as the learner's ``WeightBroadcaster.manifest`` and
    vLLM's ``NCCLWeightTransferUpdateInfo`` have them) -> specs, checking that the manifest is well formed."""
    try:
        names, dtypes, shapes = manifest["names"], manifest["dtype_names"], manifest["shapes"]
    except (KeyError, TypeError) as e:
        raise WeightManifestError("a weight manifest is a dict of 'names', 'dtype_names' and 'shapes'") from e
    if not len(names) == len(dtypes) == len(shapes):
        raise WeightManifestError(f"manifest lists differ in length: {len(names)} names, {len(dtypes)} dtype_names, "
                                  f"{len(shapes)} shapes")
    specs: list[WeightSpec] = []
    seen: set[str] = set()
    for name, dt, shape in zip(names, dtypes, shapes):
        if name in seen:
            raise WeightManifestError(f"{name!r} appears twice in the manifest")
        seen.add(name)
        dtype = getattr(torch, dt, None) if isinstance(dt, str) else None
        if not isinstance(dtype, torch.dtype):
            raise WeightManifestError(f"{name!r}: unknown dtype {dt!r}")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise WeightManifestError(f"{name!r}: a shape is a list of non-negative ints, got {shape!r}")
        specs.append(WeightSpec(name, dtype, tuple(shape)))
    return specs


def check_manifest(published: Sequence[WeightSpec], expected: Sequence[WeightSpec],
                   allow_missing: Collection[str] = ()) -> None:
    """Raise ``WeightManifestError`` unless every published tensor is one the engine expects, with its shape and
    dtype, and every expected tensor is published (except ``allow_missing``, e.g. a tied ``lm_head.weight``: a tensor
    that is not sent keeps its old values)."""
    want = {s.name: s for s in expected}
    problems: list[str] = []
    for s in published:
        e = want.get(s.name)
        if e is None:
            problems.append(f"{s.name!r} is published but the engine's model has no such weight")
            continue
        if s.shape != e.shape:
            problems.append(f"{s.name!r} has shape {s.shape}, the engine expects {e.shape}")
        if s.dtype != e.dtype:
            problems.append(f"{s.name!r} is {dtype_name(s.dtype)} on the wire, the engine serves "
                            f"{dtype_name(e.dtype)} (set the learner's wire_dtype)")
    sent = {s.name for s in published}
    problems += [f"{e.name!r} is expected by the engine but not published (it would keep stale weights)"
                 for e in expected if e.name not in sent and e.name not in allow_missing]
    if problems:
        shown = "\n  ".join(problems[:_MAX_PROBLEMS_SHOWN])
        more = len(problems) - _MAX_PROBLEMS_SHOWN
        raise WeightManifestError(f"{len(problems)} published weight(s) do not match this engine:\n  {shown}"
                                  + (f"\n  ... and {more} more" if more > 0 else ""))


def checkpoint_specs(model_dir: str | os.PathLike, serving_dtype: torch.dtype | None = None
                     ) -> list[WeightSpec] | None:
    """What an engine started from ``model_dir`` expects: the tensors of its safetensors checkpoint, read from the
    headers only. Floating-point tensors take ``serving_dtype`` (vLLM casts the whole model to it). None when the
    folder holds no safetensors checkpoint."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        # A folder may also hold other safetensors files (e.g. consolidated copies); the index says which count.
        files = sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    specs: list[WeightSpec] = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                header = f.get_slice(name)
                dtype = _SAFETENSORS_DTYPES.get(header.get_dtype())
                if dtype is None:
                    continue
                if serving_dtype is not None and dtype.is_floating_point:
                    dtype = serving_dtype
                specs.append(WeightSpec(name, dtype, tuple(int(d) for d in header.get_shape())))
    return specs


def _unpack(buffer: Tensor, offset: int, spec: WeightSpec) -> Tensor:
    piece = buffer[offset:offset + spec.nbytes]
    if offset % spec.dtype.itemsize:
        # Reinterpreting bytes as a wider dtype needs an aligned start; a tensor after an odd-sized one gets a copy.
        piece = piece.clone()
    return piece.view(spec.dtype).view(spec.shape)


def receive_weights(channel: Any, specs: Sequence[WeightSpec], bucket_bytes: int, src: int = 0
                    ) -> Iterator[tuple[str, Tensor]]:
    """Receive the broadcast bucket by bucket and yield ``(name, tensor)`` in manifest order. The tensors are views
    of a fresh buffer per bucket, never reused, because vLLM's layerwise reload may hold them until a layer is
    complete. ``channel`` is any object with ``device`` and ``broadcast(tensor, src, what)``."""
    plan = plan_buckets([s.nbytes for s in specs], bucket_bytes)
    for k, (start, stop) in enumerate(plan):
        chunk = specs[start:stop]
        size = sum(s.nbytes for s in chunk)
        buffer = torch.empty(size, dtype=torch.uint8, device=channel.device)
        channel.broadcast(buffer, src, f"bucket {k + 1}/{len(plan)} ({chunk[0].name} .. {chunk[-1].name}, "
                                       f"{size} bytes)")
        offset = 0
        for spec in chunk:
            yield spec.name, _unpack(buffer, offset, spec)
            offset += spec.nbytes


# ----------------------------------------------------------------------------------------------------------------------
# The worker extension
# ----------------------------------------------------------------------------------------------------------------------


class WeightTransferExtension(WeightLoaderExtension):
    """Mixed into vLLM's worker class (``worker_extension_cls="actors.weight_transfer.WeightTransferExtension"``);
    keeps the file path's ``load_policy_weights`` and adds the broadcast path. Methods run in each worker process."""

    def init_weight_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                          timeout_s: float = DEFAULT_TIMEOUT_S, backend: str = "nccl") -> int:
        """Join learner rank 0's broadcast group; returns this worker's rank in it.

        Args:
            master_address, master_port: the rendezvous learner rank 0 hosts.
            rank_offset: the group rank of this engine's first worker (``learners.weight_broadcast.group_layout``);
                a worker's rank is ``rank_offset + dp_index * workers_per_replica + its rank in the engine``, as in
                vLLM's own weight-transfer engines.
            world_size: 1 + all workers of all engines.
            timeout_s: bound on the rendezvous and on every later broadcast.
            backend: ``"nccl"`` (GPU engines) or ``"gloo"`` (CPU tensors).
        """
        self.close_weight_group()
        parallel = self.vllm_config.parallel_config
        rank = rank_offset + getattr(parallel, "data_parallel_index", 0) * parallel.world_size + parallel.rank
        device = getattr(self, "device", None)
        device = device if isinstance(device, torch.device) and device.type == "cuda" else None
        if not 0 < rank < world_size:
            raise ValueError(f"a worker's rank must be in 1..{world_size - 1} (rank 0 is the learner), got {rank}")
        self._weight_channel = open_channel(backend, master_address, master_port, rank, world_size, timeout_s, device)
        return rank

    def check_policy_weights(self, manifest: Mapping[str, Sequence]) -> int:
        """Check a manifest against the checkpoint this engine serves, before any broadcast, so a mismatch surfaces
        as an error naming the parameters rather than as a timeout. Returns the number of tensors."""
        specs = parse_manifest(manifest)
        expected, allow_missing = self._weight_expectations()
        if expected is None:
            logger.warning("no safetensors checkpoint at %s: published weights are not checked against it",
                           self.vllm_config.model_config.model)
        else:
            check_manifest(specs, expected, allow_missing)
        return len(specs)

    def receive_policy_weights(self, manifest: Mapping[str, Sequence],
                               bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> dict[str, float]:
        """Receive one policy version and load it in place; returns the number of tensors loaded and the
        ``weights_checksum`` of what was received. Runs while the learner ranks run ``WeightBroadcaster.broadcast``
        with the same manifest and ``bucket_bytes``."""
        channel = getattr(self, "_weight_channel", None)
        if channel is None or not channel.is_open:
            raise RuntimeError("no weight-sync group: call init_weight_group first")
        specs = parse_manifest(manifest)
        expected, allow_missing = self._weight_expectations()
        if expected is not None:
            check_manifest(specs, expected, allow_missing)
        stream = receive_weights(channel, specs, bucket_bytes)
        loaded, checksum = 0, 0.0

        def counted() -> Iterator[tuple[str, Tensor]]:
            nonlocal loaded, checksum
            for name, tensor in stream:
                loaded += 1
                checksum += weights_checksum([tensor])
                yield name, tensor

        try:
            self._load_received(counted())
        except Exception:
            # The learner is still sending: take the rest so the group stays in step and the driver sees this error
            # instead of a timeout. A channel error (timeout) has already closed the channel and ended the stream.
            self._drain(stream, channel)
            raise
        if loaded != len(specs):
            self._drain(stream, channel)
            raise RuntimeError(f"model.load_weights consumed {loaded} of {len(specs)} published tensors")
        return {"tensors": loaded, "checksum": checksum}

    def close_weight_group(self) -> None:
        channel, self._weight_channel = getattr(self, "_weight_channel", None), None
        if channel is not None:
            channel.close()

    # -- the parts that touch vLLM's internals ------------------------------------------------------------------------

    def _load_received(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """vLLM's in-place reload (``model.load_weights`` between the layerwise reload hooks), as ``reload_weights``
        does for the file path; on a CPU engine, also the GEMM repack the file path needs."""
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):
            self.model_runner.reload_weights(weights_iterator=weights)
            first = next(self.model_runner.get_model().parameters(), None)
            if first is not None and first.device.type == "cpu":
                self._repack_embedding_gemms()

    def _weight_expectations(self) -> tuple[list[WeightSpec] | None, frozenset[str]]:
        """The engine's checkpoint (names, shapes; the serving dtype), read once; plus what may go unpublished."""
        cached = getattr(self, "_weight_expectations_cache", None)
        if cached is None:
            model_config = self.vllm_config.model_config
            path = str(model_config.model)
            expected = checkpoint_specs(path, model_config.dtype) if os.path.isdir(path) else None
            text_config = getattr(model_config, "hf_text_config", None) or model_config.hf_config
            # A tied output projection is the embedding: the learner publishes it once, under the embedding's name.
            tied = bool(getattr(text_config, "tie_word_embeddings", False))
            cached = (expected, frozenset({"lm_head.weight"}) if tied else frozenset())
            self._weight_expectations_cache = cached
        return cached

    @staticmethod
    def _drain(stream: Iterator[tuple[str, Tensor]], channel: Any) -> None:
        if not channel.is_open:
            return
        try:
            for _ in stream:
                pass
        except Exception:
            logger.exception("could not drain the rest of a failed weight broadcast")
