"""torch.distributed for a learner rank living inside a Ray actor.

Ray starts each learner actor as a plain process, so nothing has set the variables that ``torchrun`` would. Rank 0
picks its own address and a free port; the caller hands them to every rank, and each rank exports the usual env
variables and joins the group through DeepSpeed. Gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

# How long ranks wait for each other at rendezvous and in collectives before failing loudly rather than hanging.
DEFAULT_TIMEOUT_S = 600.0
# A torch extension build lock older than this was left by a killed process (a live build holds it for seconds).
STALE_BUILD_LOCK_S = 120.0


def node_ip() -> str:
    """An address other ranks can reach this process at (loopback when the host has no routable address)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:  # pragma: no cover - ray is a dependency, but this module does not need it
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def free_port() -> int:
    """A TCP port that was free a moment ago; rank 0 asks for one and every rank rendezvous on it."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def use_cpu_threads(threads: int, ranks_on_machine: int = 1) -> None:
    """Give a CPU learner its share of the machine's cores.

    Ray sets ``OMP_NUM_THREADS=1`` in an actor holding one logical CPU, so torch would train on one core. The driver's
    loop is synchronous (engines idle while learners train), so a learner may use the cores it shares with them.
    ``threads`` 0 means ``os.cpu_count() // ranks_on_machine``. No effect on a GPU learner.
    """
    if torch.cuda.is_available():
        return
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(1, ranks_on_machine)))


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Export the torchrun variables and join the process group through DeepSpeed.

    ``LOCAL_RANK`` is 0: Ray gives each GPU actor its own ``CUDA_VISIBLE_DEVICES``, so the one visible device is
    always device 0. Idempotent: a second call in an initialised process does nothing.
    """
    if dist.is_available() and dist.is_initialized():
        return
    os.environ.update({
        "RANK": str(rank),
        "LOCAL_RANK": "0",
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    })
    use_environment_build_dir()
    import deepspeed

    clear_stale_build_locks()
    deepspeed.init_distributed(dist_backend=backend or default_backend(), timeout=timedelta(seconds=timeout_s))
    if torch.cuda.is_available():
        torch.cuda.set_device(0)


def use_environment_build_dir() -> Path:
    """Build DeepSpeed's JIT ops inside this Python environment (``TORCH_EXTENSIONS_DIR``, unless set).

    torch's default build folder is one per user, shared by every environment. Two checkouts with their own
    environments then rebuild the same op over each other, each time the other one ran, and one may load the library
    while the other rewrites it. One folder per environment builds each op once, at ``make setup``.

    The build runs the environment's own ``ninja`` (the pip package) whenever it has one. A shell's PATH may find
    another first (a system ninja), while Ray's workers find the environment's: two ninja versions hash a command
    line differently, so each took the other's build for a changed command and rebuilt the op, for 30-50 s, every
    time a learner in one kind of process followed one in the other (three times in the first 8 minutes of ``make
    test``)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "").split(os.pathsep)
    if (Path(bin_dir) / "ninja").is_file() and path[:1] != [bin_dir]:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *(p for p in path if p != bin_dir)])
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def build_cpu_ops() -> None:
    """Build the ops the CPU accelerator needs at the first learner start (``make setup`` calls this)."""
    use_environment_build_dir()
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        ShareMemCommBuilder().load(verbose=False)


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> list[str]:
    """Remove torch JIT-extension build locks older than ``max_age_s`` (DeepSpeed builds its CPU ops, such as
    ``deepspeed_shm_comm``, through torch's ``cpp_extension``). A process killed while it held one leaves the lock
    behind, and every later learner waits on it for good, up to its start-up timeout. A live build holds its lock for
    seconds, not minutes. Returns the locks removed."""
    from torch.utils.cpp_extension import get_default_build_root

    # Builds live in <root>/<name>/, or <root>/<py..._cpu|cu...>/<name>/ under the default root.
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    removed = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        with contextlib.suppress(OSError):
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(str(lock))
                print(f"removed a stale build lock left by a killed process: {lock}", flush=True)
    return removed


def init_single_process(backend: str | None = None) -> None:
    """A world of one (tests, scripts): rank 0 on a free local port."""
    init_distributed(0, 1, "127.0.0.1", free_port(), backend)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def collective_device() -> torch.device:
    """Where a collective's tensors must live: NCCL reduces only CUDA tensors, gloo only CPU ones."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce ``tensor`` in place over the group, moving it to the backend's device and back."""
    if world_size() == 1:
        return tensor
    on_device = tensor.to(collective_device())
    dist.all_reduce(on_device, op=op)
    tensor.copy_(on_device)
    return tensor


def _all_reduce(value: float, op: dist.ReduceOp) -> float:
    if world_size() == 1:
        return value
    return all_reduce_(torch.tensor([value], dtype=torch.float64), op).item()


def all_reduce_sum(value: float) -> float:
    """Σ over ranks (token counts: the global denominator of the token-mean loss). float64 keeps counts exact."""
    return _all_reduce(float(value), dist.ReduceOp.SUM)


def all_reduce_max(value: float) -> float:
    """max over ranks (the number of micro-batches every rank must run so collectives line up)."""
    return _all_reduce(float(value), dist.ReduceOp.MAX)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


if __name__ == "__main__":
    build_cpu_ops()
