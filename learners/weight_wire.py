"""The weight-sync wire, the one module the learner and actor sides share (the learners own it; ``actors`` imports
only this from ``learners``): the rendezvous, the gloo and NCCL channels with their deadlines, the bucket plan, and the
weights checksum. Learner rank 0 sends through it (``learners/weight_broadcast.py``); every vLLM worker receives
through it (``actors/weight_transfer.py``). Both ends derive the bucket plan from the manifest alone, so one copy of
the plan is what keeps them in step.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any, Protocol

import torch
from torch import Tensor

# Bytes per broadcast. Large enough that a 7B bf16 model (14 GB) goes in ~55 collectives, whose fixed cost is then
# negligible; small enough for the receivers' spare GPU memory, since a worker holds up to a bucket plus one tensor
# beyond its KV cache while loading. Must be the same on the learner and on every engine.
DEFAULT_BUCKET_BYTES = 256 * 1024**2
# Longest any one cross-process step may take: the rendezvous (every engine must join within it) and each bucket's
# broadcast, which also waits for the receivers to finish loading the previous bucket.
DEFAULT_TIMEOUT_S = 300.0
# Gloo's keys in the rendezvous store, apart from the keys PyNcclCommunicator writes.
GLOO_STORE_PREFIX = "zerosearch-weight-sync/"

Manifest = dict[str, list]
"""``{"names": [str], "dtype_names": [str], "shapes": [[int]]}``: plain lists, so it passes through Ray and vLLM's
msgpack-based ``collective_rpc`` unchanged, and it is the payload of vLLM's ``NCCLWeightTransferUpdateInfo``."""


class Channel(Protocol):
    """One end of the broadcast group. ``broadcast`` fills ``tensor`` on receivers, blocks until the collective has
    completed on this rank, and raises ``TimeoutError`` past the channel's timeout."""

    device: torch.device

    def broadcast(self, tensor: Tensor, src: int, what: str) -> None: ...

    def close(self) -> None: ...


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, as vLLM's update info spells it (``getattr(torch, name)`` inverts it)."""
    return str(dtype).removeprefix("torch.")


def plan_buckets(nbytes: Sequence[int], bucket_bytes: int) -> list[tuple[int, int]]:
    """Split tensors (their sizes, in send order) into buckets: ``[(start, stop)]`` index ranges, consecutive, each
    tensor in exactly one. A bucket closes as soon as it holds MORE than ``bucket_bytes`` (vLLM's packed rule), so a
    tensor larger than the budget ends a bucket of its own and the last bucket may be smaller.

    ``actors/weight_transfer.py`` has the same function; both ends must cut the stream identically.
    """
    if bucket_bytes < 0:
        raise ValueError(f"bucket_bytes must be >= 0, got {bucket_bytes}")
    buckets: list[tuple[int, int]] = []
    start, total = 0, 0
    for i, n in enumerate(nbytes):
        total += n
        if total > bucket_bytes:
            buckets.append((start, i + 1))
            start, total = i + 1, 0
    if start < len(nbytes):
        buckets.append((start, len(nbytes)))
    return buckets


def weights_checksum(tensors: Iterable[Tensor]) -> float:
    """Σ|x| over every element in float64: what the engines report of the weights they loaded, so the driver can tell
    an engine that loaded this version from one that kept old weights or got a corrupted tensor. The engine side
    (``actors/weight_transfer.py``) computes the same sum over what it received."""
    return float(sum(float(t.detach().double().abs().sum()) for t in tensors))


def open_channel(backend: str, master_address: str, master_port: int, rank: int, world_size: int,
                 timeout_s: float = DEFAULT_TIMEOUT_S, device: torch.device | None = None) -> Channel:
    """Join the broadcast group as ``rank``: rendezvous through a TCPStore hosted by rank 0, then the data plane.
    ``device`` is the NCCL communicator's CUDA device (default: the current one); gloo works on CPU tensors."""
    if world_size < 2:
        raise ValueError(f"a broadcast group needs the learner and at least one worker, got world_size={world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the group of {world_size}")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"unknown weight-sync backend {backend!r} (nccl or gloo)")
    store = _rendezvous(master_address, master_port, rank, world_size, timeout_s)
    if backend == "gloo":
        return GlooChannel(store, rank, world_size, timeout_s)
    return NcclChannel(store, rank, world_size, timeout_s, device)


def _rendezvous(host: str, port: int, rank: int, world_size: int, timeout_s: float):
    from torch.distributed import TCPStore

    started = time.monotonic()
    try:
        # Rank 0's constructor returns once every rank has connected; the others' once they have.
        return TCPStore(host, port, world_size, rank == 0, timeout=timedelta(seconds=timeout_s))
    except Exception as e:
        if time.monotonic() - started >= timeout_s:
            raise TimeoutError(f"weight-sync rendezvous at {host}:{port} (rank {rank} of {world_size}) did not "
                               f"complete within {timeout_s:.0f} s: {e}") from e
        raise


def _run_with_timeout(fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """``fn()`` in a daemon thread, so that a blocking C call (NCCL init) cannot outlive ``timeout_s``."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = e

    thread = threading.Thread(target=target, name=what, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"{what} did not finish within {timeout_s:.0f} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def _wait_until(done: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``done`` until it is true (True) or ``timeout_s`` passes (False). The back-off starts short so a fast
    bucket costs microseconds and stays at 5 ms so a long one costs little CPU."""
    deadline = time.monotonic() + timeout_s
    pause = 5e-5
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 5e-3)
    return True


class GlooChannel:
    """The group over gloo on CPU tensors: a standalone ``ProcessGroupGloo`` on the rendezvous store, outside the
    default torch.distributed world (which on a learner is DeepSpeed's)."""

    def __init__(self, store, rank: int, world_size: int, timeout_s: float) -> None:
        from torch.distributed import PrefixStore, ProcessGroupGloo

        self.device = torch.device("cpu")
        self.rank, self.timeout_s = rank, timeout_s
        self._store = store
        self._group = ProcessGroupGloo(PrefixStore(GLOO_STORE_PREFIX, store), rank, world_size,
                                       timedelta(seconds=timeout_s))

    @property
    def is_open(self) -> bool:
        return self._group is not None

    def broadcast(self, tensor: Tensor, src: int, what: str) -> None:
        from torch.distributed import BroadcastOptions

        if self._group is None:
            raise RuntimeError("the weight-sync group is closed (or broke on a timeout); form it again")
        opts = BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        opts.timeout = timedelta(seconds=self.timeout_s)
        started = time.monotonic()
        try:
            self._group.broadcast([tensor], opts).wait(timedelta(seconds=self.timeout_s))
        except Exception as e:
            self.close()
            if time.monotonic() - started >= self.timeout_s * 0.99:
                raise TimeoutError(f"weight-sync broadcast of {what} did not complete within "
                                   f"{self.timeout_s:.0f} s: {e}") from e
            raise

    def close(self) -> None:
        group, self._group, self._store = self._group, None, None
        if group is not None:
            with contextlib.suppress(Exception):
                group.shutdown()


class NcclChannel:
    """The group over NCCL: vLLM's ``PyNcclCommunicator`` on a ``StatelessProcessGroup`` around the rendezvous store,
    on ``device`` (default: this process's current CUDA device). Each broadcast runs on that device's current stream
    and is waited for on an event."""

    def __init__(self, store, rank: int, world_size: int, timeout_s: float,
                 device: torch.device | None = None) -> None:
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        if not torch.cuda.is_available():
            raise RuntimeError("the nccl weight-sync backend needs a CUDA device; use backend='gloo' on CPU")
        self.device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
        self.rank, self.timeout_s = rank, timeout_s
        self._store, self._comm = store, None
        group = StatelessProcessGroup(rank=rank, world_size=world_size, store=store)
        with _unpinned_nccl_env():
            self._comm = _run_with_timeout(lambda: PyNcclCommunicator(group, device=self.device), timeout_s,
                                           f"NCCL communicator creation (rank {rank} of {world_size})")
        if self._comm.disabled:
            # PyNcclCommunicator silently turns every call into a no-op when it cannot load NCCL.
            raise RuntimeError("PyNcclCommunicator is disabled (NCCL library not found or VLLM_DISABLE_PYNCCL set)")

    @property
    def is_open(self) -> bool:
        return self._comm is not None

    def broadcast(self, tensor: Tensor, src: int, what: str) -> None:
        if self._comm is None:
            raise RuntimeError("the weight-sync group is closed (or broke on a timeout); form it again")
        stream = torch.cuda.current_stream(self.device)
        self._comm.broadcast(tensor, src=src, stream=stream)
        done = torch.cuda.Event()
        done.record(stream)
        if not _wait_until(done.query, self.timeout_s):
            # The NCCL kernel waits for its peers forever; only aborting the communicator releases it.
            self.close()
            raise TimeoutError(f"weight-sync broadcast of {what} did not complete within {self.timeout_s:.0f} s")

    def close(self) -> None:
        comm, self._comm, self._store = self._comm, None, None
        if comm is not None:
            comm.destroy()


def _unpinned_nccl_env() -> contextlib.AbstractContextManager:
    """vLLM may pin NCCL variables for its own communicators; a group shared with other processes is created without
    them, as vLLM's weight-transfer engines do."""
    try:
        from vllm.utils.nccl import unpinned_nccl_env
    except ImportError:
        return contextlib.nullcontext()
    return unpinned_nccl_env()
