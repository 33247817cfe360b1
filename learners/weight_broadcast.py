"""Learner side of the GPU weight sync: learner rank 0 broadcasts the full policy weights to every vLLM worker.

Why
---
The CPU path (``DeepSpeedCore.publish_weights``) writes a safetensors file that every engine reads back. On a GPU
cluster that costs a device-to-host copy, a file write, one read and host-to-device copy per engine, and storage that
every node shares. Here learner rank 0 and every vLLM worker form one extra NCCL group instead, and rank 0 broadcasts
the weights straight from GPU memory; each worker loads them in place (``actors/weight_transfer.py``).

The group
---------
Rank 0 is learner rank 0; the vLLM workers take ranks 1 .. world_size - 1, engine ``i``'s workers starting at its
``rank_offset`` (``group_layout``). Rank 0 hosts the rendezvous (a TCPStore). NCCL runs through vLLM's
``PyNcclCommunicator`` over a ``StatelessProcessGroup``, the pair vLLM's own ``nccl`` weight-transfer engine and
OpenRLHF/verl use: a learner already belongs to DeepSpeed's torch.distributed world, and a process can have only one
default group. ``backend="gloo"`` runs the same protocol on CPU tensors, for CPU engines and for the tests.

The wire
--------
The driver hands the receivers a manifest once (``manifest()``: parameter names, dtype names and shapes, the fields of
vLLM's ``NCCLWeightTransferUpdateInfo``); the data is one uint8 broadcast per bucket. A bucket is a run of consecutive
tensors in manifest order, closed as soon as it holds MORE than ``bucket_bytes``. That is the rule of vLLM's packed
broadcast (``vllm.distributed.weight_transfer.packed_tensor``), so this stream also feeds vLLM's built-in ``nccl``
engine configured with ``packed=True, packed_buffer_size_bytes=bucket_bytes``. Both ends derive the plan from the
manifest alone, so no per-bucket header travels, and a bucket can exceed ``bucket_bytes`` by less than its last tensor.

Timeouts
--------
Every cross-process step is bounded by ``timeout_s``: the rendezvous, the communicator's creation, and each bucket's
broadcast. NCCL itself has no timeout (a missing peer hangs the stream for good), so rank 0 waits for each bucket on a
CUDA event polled against a deadline, and on expiry aborts the communicator and raises ``TimeoutError``; the group must
then be formed again. The ZeRO-3 gathers are collectives of the learners' own group, bounded by its timeout
(``learners.distributed``).

ZeRO-3
------
Every learner rank calls ``broadcast`` in lockstep: each bucket's parameters are gathered together (one all-gather per
bucket, not one per tensor) and only rank 0 sends. Shapes come from ``ds_shape``, so the plan is known before gathering
and is the same on every rank.

The channels, the bucket plan and the checksum are the wire both ends share: ``learners/weight_wire.py``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from learners.weight_wire import (  # noqa: F401 - the wire's names are part of this module's interface
    DEFAULT_BUCKET_BYTES,
    DEFAULT_TIMEOUT_S,
    GLOO_STORE_PREFIX,
    Channel,
    Manifest,
    dtype_name,
    open_channel,
    plan_buckets,
    weights_checksum,
)

# ----------------------------------------------------------------------------------------------------------------------
# Pure helpers: layout, metadata, the bucket plan
# ----------------------------------------------------------------------------------------------------------------------


def group_layout(workers_per_engine: Sequence[int]) -> tuple[list[int], int]:
    """``(rank_offset per engine, world_size)`` of the broadcast group: rank 0 is the learner, then each engine's
    workers (tensor x pipeline parallel size) in a block of their own."""
    offsets, next_rank = [], 1
    for i, n in enumerate(workers_per_engine):
        if n < 1:
            raise ValueError(f"engine {i} has {n} workers; every engine needs at least one")
        offsets.append(next_rank)
        next_rank += n
    return offsets, next_rank


def full_shape(tensor: Tensor) -> tuple[int, ...]:
    """The unpartitioned shape: a ZeRO-3 parameter is an empty placeholder whose real shape is in ``ds_shape``."""
    shape = getattr(tensor, "ds_shape", None)
    return tuple(int(d) for d in (tensor.shape if shape is None else shape))


def wire_dtype_of(dtype: torch.dtype, wire_dtype: torch.dtype | None) -> torch.dtype:
    """Floating-point weights travel in ``wire_dtype`` when one is set; integer and bool tensors never change type."""
    return wire_dtype if wire_dtype is not None and dtype.is_floating_point else dtype


def describe_weights(named_tensors: Iterable[tuple[str, Tensor]], wire_dtype: torch.dtype | None = None) -> Manifest:
    """The manifest of what ``broadcast`` will send: names, wire dtypes, full shapes, in order. Reads metadata only
    (no gather, no copy)."""
    names: list[str] = []
    dtypes: list[str] = []
    shapes: list[list[int]] = []
    seen: set[str] = set()
    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"parameter {name!r} appears twice; each tensor must be published once")
        seen.add(name)
        names.append(name)
        dtypes.append(dtype_name(wire_dtype_of(tensor.dtype, wire_dtype)))
        shapes.append(list(full_shape(tensor)))
    return {"names": names, "dtype_names": dtypes, "shapes": shapes}


def manifest_nbytes(manifest: Manifest) -> list[int]:
    """Bytes of each tensor on the wire."""
    return [math.prod(shape) * getattr(torch, dt).itemsize
            for dt, shape in zip(manifest["dtype_names"], manifest["shapes"])]


def _first_difference(declared: Manifest, actual: Manifest) -> str | None:
    """Where two manifests first disagree, naming the parameter; None when they are equal."""
    for i, (name, dt, shape) in enumerate(zip(actual["names"], actual["dtype_names"], actual["shapes"])):
        if i >= len(declared["names"]):
            return f"parameter {name!r} (#{i}) is not in the declared manifest of {len(declared['names'])} tensors"
        want = (declared["names"][i], declared["dtype_names"][i], [int(d) for d in declared["shapes"][i]])
        if (name, dt, list(shape)) != want:
            return (f"tensor #{i}: declared {want[0]!r} {want[1]} {tuple(want[2])}, "
                    f"the model now has {name!r} {dt} {tuple(shape)}")
    if len(declared["names"]) > len(actual["names"]):
        return f"declared parameter {declared['names'][len(actual['names'])]!r} is no longer in the model"
    return None


def gather_zero3(tensors: Sequence[Tensor]) -> contextlib.AbstractContextManager:
    """Materialise ZeRO-3 partitioned parameters for the duration of the block (one all-gather for the whole list,
    collective over the learners' group); a no-op for ordinary tensors."""
    if not any(hasattr(t, "ds_id") for t in tensors):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(tensors), modifier_rank=None)


# ----------------------------------------------------------------------------------------------------------------------
# The broadcaster
# ----------------------------------------------------------------------------------------------------------------------


class WeightBroadcaster:
    """Broadcasts a model's weights bucket by bucket. Rank 0 holds a ``channel``; other learner ranks hold none and
    only take part in the ZeRO-3 gathers, so call ``broadcast`` on every learner rank.

    Args:
        channel: rank 0's end of the group (``connect``), or None on the other learner ranks.
        bucket_bytes: bytes per broadcast (see ``plan_buckets``); must equal the receivers' value.
        wire_dtype: floating-point weights are cast to this dtype before sending (e.g. the engines' serving dtype,
            when the learner keeps fp32 weights); None sends them in their training dtype.
        gather: context-manager factory that materialises a bucket's parameters on every learner rank
            (``gather_zero3`` by default, a no-op outside ZeRO-3).
    """

    def __init__(self, channel: Channel | None = None, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 wire_dtype: torch.dtype | None = None,
                 gather: Callable[[Sequence[Tensor]], contextlib.AbstractContextManager] = gather_zero3) -> None:
        if bucket_bytes < 0:
            raise ValueError(f"bucket_bytes must be >= 0, got {bucket_bytes}")
        self.channel = channel
        self.bucket_bytes = bucket_bytes
        self.wire_dtype = wire_dtype
        self.gather = gather

    @classmethod
    def connect(cls, master_address: str, master_port: int, world_size: int, *, backend: str = "nccl",
                timeout_s: float = DEFAULT_TIMEOUT_S, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                wire_dtype: torch.dtype | None = None) -> WeightBroadcaster:
        """Open the group as rank 0 (on learner rank 0 only). Blocks until all ``world_size - 1`` workers have joined
        (their ``init_weight_group``, issued concurrently by the driver) or ``timeout_s`` passes.

        Args:
            master_address, master_port: where rank 0 hosts the rendezvous; reachable from every engine's node.
            world_size: 1 + the number of vLLM workers (``group_layout``).
            backend: ``"nccl"`` (GPU weights, the production path) or ``"gloo"`` (CPU tensors).
            timeout_s: bound on the rendezvous and on each bucket's broadcast.
        """
        channel = open_channel(backend, master_address, master_port, 0, world_size, timeout_s)
        return cls(channel, bucket_bytes=bucket_bytes, wire_dtype=wire_dtype)

    @property
    def is_sender(self) -> bool:
        return self.channel is not None

    def manifest(self, named_tensors: Iterable[tuple[str, Tensor]]) -> Manifest:
        """What ``broadcast`` sends for these tensors; the driver passes it to every receiver. Pass
        ``module.named_parameters()`` (tied weights appear once, as in ``save_pretrained``'s checkpoints)."""
        return describe_weights(named_tensors, self.wire_dtype)

    def broadcast(self, named_tensors: Iterable[tuple[str, Tensor]], manifest: Manifest | None = None
                  ) -> dict[str, float]:
        """Send every tensor, in order, bucket by bucket; collective over the learners (ZeRO-3) and, on rank 0, over
        the broadcast group. ``manifest``, if given, is what the receivers were told: a model that no longer matches
        it raises ``ValueError`` (naming the parameter) before anything is sent.

        Returns ``{"tensors", "buckets", "bytes", "seconds", "checksum"}`` (``bytes`` and ``checksum``, the
        ``weights_checksum`` of what was sent, are 0 on ranks that do not send).
        """
        pairs = list(named_tensors)
        current = self.manifest(pairs)
        if manifest is not None and (problem := _first_difference(manifest, current)) is not None:
            raise ValueError(f"the weights no longer match the manifest the receivers expect: {problem}")
        sizes = manifest_nbytes(current)
        plan = plan_buckets(sizes, self.bucket_bytes)
        started = time.perf_counter()
        sent, checksum = 0, 0.0
        for k, (start, stop) in enumerate(plan):
            chunk = pairs[start:stop]
            # The packed copy is made inside the gather so the full parameters can be released before the broadcast.
            with self.gather([t for _, t in chunk]):
                buffer = self._pack(chunk, current, start) if self.channel is not None else None
                if buffer is not None:
                    checksum += weights_checksum(t.to(wire_dtype_of(t.dtype, self.wire_dtype)) for _, t in chunk)
            if buffer is not None:
                what = f"bucket {k + 1}/{len(plan)} ({chunk[0][0]} .. {chunk[-1][0]}, {buffer.numel()} bytes)"
                self.channel.broadcast(buffer, 0, what)
                sent += buffer.numel()
        return {"tensors": len(pairs), "buckets": len(plan), "bytes": sent,
                "seconds": time.perf_counter() - started, "checksum": checksum}

    def _pack(self, chunk: list[tuple[str, Tensor]], manifest: Manifest, start: int) -> Tensor:
        device = self.channel.device
        flats = []
        for i, (name, tensor) in enumerate(chunk, start=start):
            if list(tensor.shape) != list(manifest["shapes"][i]):
                raise ValueError(f"parameter {name!r} has shape {tuple(tensor.shape)} after gathering, but "
                                 f"{tuple(manifest['shapes'][i])} was declared (is it still partitioned?)")
            wire = tensor.detach().to(device=device, dtype=wire_dtype_of(tensor.dtype, self.wire_dtype))
            flats.append(wire.contiguous().reshape(-1).view(torch.uint8))
        return torch.cat(flats) if flats else torch.empty(0, dtype=torch.uint8, device=device)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
