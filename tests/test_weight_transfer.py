"""The GPU weight sync (``learners/weight_broadcast.py`` -> ``actors/weight_transfer.py``), tested as a CPU allows.

NCCL needs GPUs; everything else runs here: the bucket plan (worked out by hand, and both ends against each other),
the manifest and its checks, packing and unpacking, byte-for-byte agreement with vLLM's packed broadcast, timeouts, and
real multi-process round trips over gloo through the same broadcaster, channel and worker-extension code the NCCL path
uses. Only ``_load_received`` (vLLM's in-place reload) is replaced, by a stub that records what it is given.

In a round trip learner rank 0 runs in a thread of the test process, and each worker in a process of its own
(``python -m tests.test_weight_transfer worker <args.json>``), which prints one ``RESULT <json>`` line. The CUDA tests
run only where a GPU is present; the NCCL round trip needs two.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from actors import weight_transfer as A
from learners import weight_broadcast as L
from learners import weight_wire as W
from learners.distributed import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
PROCESS_TIMEOUT_S = 120
# Long enough for a loaded CI machine to start the processes, short enough that a hang fails fast.
GROUP_TIMEOUT_S = 60.0

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank: two GPUs")


# ----------------------------------------------------------------------------------------------------------------------
# Helpers shared by the tests and the subprocess roles
# ----------------------------------------------------------------------------------------------------------------------


def toy_weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    """A small fp32 'policy' with HF names; ``seed`` stands for the policy version."""
    g = torch.Generator().manual_seed(seed)
    names_shapes = [("model.embed_tokens.weight", (50, 8))]
    for i in range(2):
        names_shapes += [(f"model.layers.{i}.input_layernorm.weight", (8,)),
                         (f"model.layers.{i}.self_attn.q_proj.weight", (8, 8)),
                         (f"model.layers.{i}.mlp.up_proj.weight", (16, 8))]
    names_shapes += [("model.norm.weight", (8,)), ("lm_head.weight", (50, 8))]
    return [(name, torch.randn(shape, generator=g)) for name, shape in names_shapes]


class FakeWorker(A.WeightTransferExtension):
    """A vLLM worker reduced to what the extension reads: its place in the engine, the checkpoint it serves, and a
    reload that records what it is given (``fail_at``: raise at that tensor; ``stop_after``: stop consuming)."""

    def __init__(self, model_dir: str | Path, rank: int = 0, world_size: int = 1, device: str = "cpu") -> None:
        parallel = SimpleNamespace(rank=rank, world_size=world_size, data_parallel_index=0)
        model = SimpleNamespace(model=str(model_dir), dtype=torch.bfloat16,
                                hf_config=SimpleNamespace(tie_word_embeddings=False), hf_text_config=None)
        self.vllm_config = SimpleNamespace(parallel_config=parallel, model_config=model)
        self.device = torch.device(device)
        self.loaded: dict[str, torch.Tensor] = {}
        self.fail_at: int | None = None
        self.stop_after: int | None = None

    def _load_received(self, weights):
        for i, (name, tensor) in enumerate(weights):
            if i == self.fail_at:
                raise KeyError(f"no parameter {name}")
            self.loaded[name] = tensor.to("cpu", copy=True)
            if self.stop_after is not None and i + 1 == self.stop_after:
                return


def write_checkpoint(directory: Path, weights, dtype=torch.bfloat16) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({n: t.to(dtype).contiguous() for n, t in weights}, str(directory / "model.safetensors"))
    return directory


class RecordingChannel:
    """Rank 0's end that keeps a copy of every buffer it is asked to send."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.sent: list[torch.Tensor] = []

    def broadcast(self, tensor, src, what):
        assert src == 0
        self.sent.append(tensor.clone())

    def close(self):
        pass


class ReplayChannel:
    """A receiver's end that hands out the recorded buffers in order, checking each receive buffer's size."""

    def __init__(self, sent: list[torch.Tensor], device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.sent = list(sent)
        self.received = 0
        self.is_open = True

    def broadcast(self, tensor, src, what):
        source = self.sent[self.received]
        assert tensor.numel() == source.numel(), f"{what}: receive buffer {tensor.numel()} B, sent {source.numel()} B"
        tensor.copy_(source)
        self.received += 1

    def close(self):
        self.is_open = False


def _wire(weights, dtype):
    return {n: t.to(dtype) if t.is_floating_point() else t for n, t in weights}


# ----------------------------------------------------------------------------------------------------------------------
# The bucket plan
# ----------------------------------------------------------------------------------------------------------------------


def test_plan_buckets_by_hand():
    plan = W.plan_buckets
    # Budget 8: 4, 8 (not more than 8), 12 > 8 closes [0, 1, 2]; 10 > 8 closes [3]; 1, 2, 3 are left for the end.
    assert plan([4, 4, 4, 10, 1, 1, 1], 8) == [(0, 3), (3, 4), (4, 7)]
    # Exactly at the budget stays open: 8 then 16 > 8.
    assert plan([8, 8, 8], 8) == [(0, 2), (2, 3)]
    # A budget larger than everything: one collective.
    assert plan([4, 4, 4], 1 << 30) == [(0, 3)]
    # Budget 0: every non-empty tensor closes its bucket; an empty tensor rides with the next one.
    assert plan([3, 0, 5], 0) == [(0, 1), (1, 3)]
    assert plan([], 8) == []
    with pytest.raises(ValueError):
        plan([1], -1)


def test_plan_buckets_invariants():
    rng = random.Random(0)
    for _ in range(300):
        sizes = [rng.choice([0, 1, 2, 64, 1000, 4096, 70000]) for _ in range(rng.randrange(0, 40))]
        budget = rng.choice([0, 1, 100, 4096, 65536, 10**6])
        plan = W.plan_buckets(sizes, budget)
        # Every tensor exactly once, in order.
        assert [i for start, stop in plan for i in range(start, stop)] == list(range(len(sizes)))
        for k, (start, stop) in enumerate(plan):
            assert stop > start
            # Greedy: without its last tensor a bucket is within budget; every bucket but the last exceeds it.
            assert sum(sizes[start:stop - 1]) <= budget
            if k < len(plan) - 1:
                assert sum(sizes[start:stop]) > budget


def test_both_ends_take_the_wire_from_one_module():
    # The sender and the receivers must cut the stream alike and meet under the same keys: one definition each.
    for name in ("plan_buckets", "open_channel", "weights_checksum", "DEFAULT_BUCKET_BYTES", "GLOO_STORE_PREFIX"):
        assert getattr(L, name) is getattr(W, name) and getattr(A, name) is getattr(W, name), name


def test_group_layout():
    assert L.group_layout([1]) == ([1], 2)
    # Two engines of tensor-parallel size 2 and one of 1.
    assert L.group_layout([2, 2, 1]) == ([1, 3, 5], 6)
    with pytest.raises(ValueError, match="engine 1"):
        L.group_layout([1, 0])


# ----------------------------------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------------------------------


def test_manifest_round_trip_through_json():
    weights = [("w", torch.randn(3, 5)), ("scalar", torch.tensor(2.5)), ("ids", torch.arange(4).view(2, 2)),
               ("flags", torch.tensor([True, False, True])), ("half", torch.randn(2, dtype=torch.float16))]
    manifest = L.describe_weights(weights, wire_dtype=torch.bfloat16)
    # Floating-point tensors take the wire dtype; integers and bools keep theirs.
    assert manifest == {"names": ["w", "scalar", "ids", "flags", "half"],
                        "dtype_names": ["bfloat16", "bfloat16", "int64", "bool", "bfloat16"],
                        "shapes": [[3, 5], [], [2, 2], [3], [2]]}
    # The driver passes it through Ray and vLLM's msgpack RPC; JSON is as strict (tuples become lists).
    specs = A.parse_manifest(json.loads(json.dumps(manifest)))
    assert specs == [A.WeightSpec("w", torch.bfloat16, (3, 5)), A.WeightSpec("scalar", torch.bfloat16, ()),
                     A.WeightSpec("ids", torch.int64, (2, 2)), A.WeightSpec("flags", torch.bool, (3,)),
                     A.WeightSpec("half", torch.bfloat16, (2,))]
    assert [s.nbytes for s in specs] == L.manifest_nbytes(manifest) == [30, 2, 32, 3, 4]


def test_manifest_uses_the_full_shape_of_a_zero3_parameter():
    partitioned = torch.nn.Parameter(torch.empty(0))
    partitioned.ds_shape = torch.Size([4, 6])
    scalar = torch.nn.Parameter(torch.empty(0))
    scalar.ds_shape = torch.Size([])
    manifest = L.describe_weights([("p", partitioned), ("s", scalar)])
    assert manifest["shapes"] == [[4, 6], []]


def test_describe_rejects_a_duplicate_name():
    with pytest.raises(ValueError, match="'a' appears twice"):
        L.describe_weights([("a", torch.zeros(1)), ("a", torch.zeros(1))])


@pytest.mark.parametrize("manifest, match", [
    ({"names": ["a"], "dtype_names": ["float32"]}, "a dict of 'names'"),
    ({"names": ["a", "b"], "dtype_names": ["float32"], "shapes": [[1], [1]]}, "differ in length"),
    ({"names": ["a", "a"], "dtype_names": ["float32"] * 2, "shapes": [[1], [1]]}, "'a' appears twice"),
    ({"names": ["a"], "dtype_names": ["float33"], "shapes": [[1]]}, "'a': unknown dtype 'float33'"),
    ({"names": ["a"], "dtype_names": ["Tensor"], "shapes": [[1]]}, "'a': unknown dtype"),
    ({"names": ["a"], "dtype_names": ["float32"], "shapes": [[2, -1]]}, "'a': a shape"),
    ({"names": ["a"], "dtype_names": ["float32"], "shapes": [[2.0]]}, "'a': a shape"),
])
def test_parse_manifest_rejects_malformed(manifest, match):
    with pytest.raises(A.WeightManifestError, match=match):
        A.parse_manifest(manifest)


def test_check_manifest_names_every_parameter_at_fault():
    expected = [A.WeightSpec("embed", torch.bfloat16, (10, 4)), A.WeightSpec("norm", torch.bfloat16, (4,)),
                A.WeightSpec("head", torch.bfloat16, (10, 4)), A.WeightSpec("lm_head.weight", torch.bfloat16, (10, 4))]
    good = expected[:3]
    A.check_manifest(good, expected, allow_missing={"lm_head.weight"})

    published = [A.WeightSpec("embed", torch.bfloat16, (10, 5)), A.WeightSpec("norm", torch.float32, (4,)),
                 A.WeightSpec("extra", torch.bfloat16, (1,))]
    with pytest.raises(A.WeightManifestError) as err:
        A.check_manifest(published, expected, allow_missing={"lm_head.weight"})
    message = str(err.value)
    assert "4 published weight(s) do not match" in message
    assert "'embed' has shape (10, 5), the engine expects (10, 4)" in message
    assert "'norm' is float32 on the wire, the engine serves bfloat16 (set the learner's wire_dtype)" in message
    assert "'extra' is published but the engine's model has no such weight" in message
    assert "'head' is expected by the engine but not published" in message
    assert "lm_head" not in message

    with pytest.raises(A.WeightManifestError, match="'lm_head.weight' is expected"):
        A.check_manifest(good, expected)


def test_checkpoint_specs_reads_headers_and_takes_the_serving_dtype(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2, 3, dtype=torch.bfloat16), "n": torch.zeros(5, dtype=torch.int64)},
              str(tmp_path / "model.safetensors"))
    assert A.checkpoint_specs(tmp_path) == [A.WeightSpec("a", torch.bfloat16, (2, 3)),
                                            A.WeightSpec("n", torch.int64, (5,))]
    assert A.checkpoint_specs(tmp_path, torch.float16) == [A.WeightSpec("a", torch.float16, (2, 3)),
                                                           A.WeightSpec("n", torch.int64, (5,))]

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"x": torch.zeros(1)}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({"y": torch.zeros(2, 2)}, str(sharded / "model-00002-of-00002.safetensors"))
    save_file({"stray": torch.zeros(1)}, str(sharded / "consolidated.safetensors"))
    index = {"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert [s.name for s in A.checkpoint_specs(sharded)] == ["x", "y"]
    assert A.checkpoint_specs(tmp_path / "nothing-here") is None


# ----------------------------------------------------------------------------------------------------------------------
# Packing, unpacking, the learner's rules (in one process)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wire_dtype", [None, torch.bfloat16])
def test_in_process_round_trip(wire_dtype):
    # An odd-sized bool tensor before fp32 ones exercises the unaligned unpack.
    weights = toy_weights(1)[:3] + [("flags", torch.tensor([True, False, True]))] + toy_weights(1)[3:]
    weights.append(("scalar", torch.tensor(-1.5)))
    sender = L.WeightBroadcaster(RecordingChannel(), bucket_bytes=300, wire_dtype=wire_dtype)
    manifest = sender.manifest(weights)
    stats = sender.broadcast(weights, manifest)

    sizes = L.manifest_nbytes(manifest)
    plan = L.plan_buckets(sizes, 300)
    assert len(plan) > 2
    assert stats["buckets"] == len(plan) == len(sender.channel.sent)
    assert stats["tensors"] == len(weights) and stats["bytes"] == sum(sizes)
    assert [b.numel() for b in sender.channel.sent] == [sum(sizes[a:b]) for a, b in plan]

    received = dict(A.receive_weights(ReplayChannel(sender.channel.sent), A.parse_manifest(manifest), 300))
    expected = _wire(weights, wire_dtype) if wire_dtype else dict(weights)
    assert list(received) == [n for n, _ in weights]
    for name, tensor in expected.items():
        assert received[name].dtype == tensor.dtype and received[name].shape == tensor.shape
        assert torch.equal(received[name], tensor), name


def test_only_rank_zero_sends_but_every_rank_gathers_each_bucket():
    gathered: list[list[int]] = []

    def gather(tensors):
        gathered.append([t.numel() for t in tensors])
        return nullcontext()

    weights = toy_weights(0)
    other_rank = L.WeightBroadcaster(None, bucket_bytes=1000, gather=gather)
    stats = other_rank.broadcast(weights)
    plan = L.plan_buckets(L.manifest_nbytes(other_rank.manifest(weights)), 1000)
    assert stats["bytes"] == 0 and stats["buckets"] == len(plan)
    assert gathered == [[t.numel() for _, t in weights[a:b]] for a, b in plan]


def test_a_stale_manifest_fails_before_anything_is_sent():
    channel = RecordingChannel()
    sender = L.WeightBroadcaster(channel)
    manifest = sender.manifest(toy_weights(0))
    changed = toy_weights(0)
    changed[2] = (changed[2][0], torch.zeros(9, 8))
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj.weight"):
        sender.broadcast(changed, manifest)
    with pytest.raises(ValueError, match="'model.norm.weight' is no longer in the model"):
        sender.broadcast(toy_weights(0)[:-2], manifest)
    assert channel.sent == []


def test_a_parameter_left_partitioned_is_named():
    partitioned = torch.nn.Parameter(torch.empty(0))
    partitioned.ds_shape = torch.Size([2, 3])
    sender = L.WeightBroadcaster(RecordingChannel(), gather=lambda tensors: nullcontext())
    with pytest.raises(ValueError, match="'p' has shape \\(0,\\) after gathering"):
        sender.broadcast([("p", partitioned)])


def _sent(weights, bucket_bytes, wire_dtype=torch.bfloat16):
    sender = L.WeightBroadcaster(RecordingChannel(), bucket_bytes=bucket_bytes, wire_dtype=wire_dtype)
    manifest = sender.manifest(weights)
    sender.broadcast(weights, manifest)
    return manifest, sender.channel.sent


def test_a_failed_load_still_takes_the_rest_of_the_broadcast(tmp_path):
    weights = toy_weights(3)
    write_checkpoint(tmp_path, weights)
    manifest, sent = _sent(weights, 200)
    assert len(sent) > 2

    worker = FakeWorker(tmp_path)
    worker._weight_channel = replay = ReplayChannel(sent)
    worker.fail_at = 1
    with pytest.raises(KeyError):
        worker.receive_policy_weights(manifest, 200)
    assert replay.received == len(sent)  # the group stays in step with the learner

    worker._weight_channel = replay = ReplayChannel(sent)
    worker.fail_at, worker.stop_after = None, 2
    with pytest.raises(RuntimeError, match=f"consumed 2 of {len(weights)}"):
        worker.receive_policy_weights(manifest, 200)
    assert replay.received == len(sent)


def test_the_worker_refuses_a_manifest_its_checkpoint_does_not_match(tmp_path):
    weights = toy_weights(0)
    write_checkpoint(tmp_path, weights)
    worker = FakeWorker(tmp_path)
    assert worker.check_policy_weights(L.describe_weights(weights, torch.bfloat16)) == len(weights)
    with pytest.raises(A.WeightManifestError, match="'model.norm.weight' is float32 on the wire"):
        worker.check_policy_weights(L.describe_weights(weights))
    with pytest.raises(RuntimeError, match="init_weight_group first"):
        worker.receive_policy_weights(L.describe_weights(weights, torch.bfloat16))


# ----------------------------------------------------------------------------------------------------------------------
# Agreement with vLLM's packed broadcast (the wire of its built-in `nccl` weight-transfer engine)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Tensor .* exceeds buffer_size_bytes")
def test_the_stream_is_vllms_packed_broadcast(monkeypatch):
    packed = pytest.importorskip("vllm.distributed.weight_transfer.packed_tensor")
    weights = toy_weights(5)
    manifest, sent = _sent(weights, 700)
    wire = _wire(weights, torch.bfloat16)

    # vLLM's producer packs the same tensors into the same chunks, byte for byte.
    iterator = iter(wire.items())
    chunks = []
    while (chunk := packed.pack_tensors(iterator, lambda item: item[1], 700)) is not None:
        chunks.append(chunk)
    assert [c.names for c in chunks] == [manifest["names"][a:b] for a, b in L.plan_buckets(
        L.manifest_nbytes(manifest), 700)]
    assert all(torch.equal(c.packed_tensor, s) for c, s in zip(chunks, sent, strict=True))

    # vLLM's consumer (the worker side of its `nccl` engine) decodes our broadcast. Its CUDA streams are stubbed.
    class Stream:
        def synchronize(self):
            pass

    monkeypatch.setattr(packed, "_get_streams", lambda device, n: tuple(Stream() for _ in range(n)))
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: nullcontext())
    group = ReplayChannel(sent)
    loaded: dict[str, torch.Tensor] = {}
    packed.packed_nccl_broadcast_consumer(
        iterator=((n, (list(s), getattr(torch, d))) for n, d, s in zip(*manifest.values())),
        group=SimpleNamespace(broadcast=lambda tensor, src: group.broadcast(tensor, src, "chunk")),
        src=0, post_unpack_func=lambda pairs: loaded.update({n: t.clone() for n, t in pairs}),
        buffer_size_bytes=700, num_buffers=2, device="cpu")
    assert group.received == len(sent)
    assert list(loaded) == list(wire) and all(torch.equal(loaded[n], t) for n, t in wire.items())


# ----------------------------------------------------------------------------------------------------------------------
# Timeouts (gloo, two threads of this process)
# ----------------------------------------------------------------------------------------------------------------------


def test_rendezvous_times_out_when_no_worker_joins():
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="rendezvous"):
        L.WeightBroadcaster.connect("127.0.0.1", free_port(), 2, backend="gloo", timeout_s=1)
    assert time.monotonic() - started < 20


@contextmanager
def _gloo_pair(timeout_s: float):
    """Learner rank 0 and one worker channel, joined from two threads."""
    port = free_port()
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("learner", L.WeightBroadcaster.connect(
        "127.0.0.1", port, 2, backend="gloo", timeout_s=timeout_s)))
    thread.start()
    worker = W.open_channel("gloo", "127.0.0.1", port, 1, 2, timeout_s)
    thread.join(timeout_s + 10)
    try:
        yield box["learner"], worker
    finally:
        worker.close()
        box["learner"].close()


def test_a_receiver_times_out_when_the_learner_sends_nothing():
    with _gloo_pair(timeout_s=1.0) as (_, worker):
        specs = [A.WeightSpec("w", torch.float32, (4,))]
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"bucket 1/1 \(w .. w, 16 bytes\) did not complete within 1 s"):
            next(A.receive_weights(worker, specs, 1024))
        assert time.monotonic() - started < 20
        assert not worker.is_open
        with pytest.raises(RuntimeError, match="closed"):
            next(A.receive_weights(worker, specs, 1024))


def test_the_gloo_pair_carries_a_broadcast_in_threads():
    with _gloo_pair(timeout_s=GROUP_TIMEOUT_S) as (learner, worker):
        weights = toy_weights(7)
        manifest = learner.manifest(weights)
        box: dict = {}
        thread = threading.Thread(target=lambda: box.setdefault("stats", learner.broadcast(weights, manifest)))
        thread.start()
        received = dict(A.receive_weights(worker, A.parse_manifest(manifest), learner.bucket_bytes))
        thread.join(GROUP_TIMEOUT_S)
        assert box["stats"]["tensors"] == len(weights)
        assert all(torch.equal(received[n], t) for n, t in weights)


# ----------------------------------------------------------------------------------------------------------------------
# Multi-process round trips: learner rank 0 (a thread of this process) and the workers of one engine (processes)
# ----------------------------------------------------------------------------------------------------------------------


def _spawn(role: str, args: dict, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.test_weight_transfer", role, json.dumps(args)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", **env})


def _result(proc: subprocess.Popen) -> dict:
    try:
        out, err = proc.communicate(timeout=PROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, err[-4000:]
    [line] = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


def _round_trip(tmp_path: Path, backend: str, engine_size: int, worker_gpus: list[str] | None = None) -> None:
    """One engine of ``engine_size`` workers (tensor-parallel ranks) receives two policy versions."""
    write_checkpoint(tmp_path / "ckpt", toy_weights(0))  # what the engine started from
    offsets, world_size = L.group_layout([engine_size])
    bucket_bytes = 700
    manifest = L.WeightBroadcaster(None, wire_dtype=torch.bfloat16).manifest(toy_weights(0))
    common = {"port": free_port(), "world_size": world_size, "backend": backend, "bucket_bytes": bucket_bytes,
              "manifest": manifest, "versions": [1, 2]}
    workers = [_spawn("worker", {**common, "rank_in_engine": r, "engine_size": engine_size,
                                 "rank_offset": offsets[0], "model_dir": str(tmp_path / "ckpt")},
                      {"CUDA_VISIBLE_DEVICES": worker_gpus[r]} if worker_gpus else {})
               for r in range(engine_size)]
    box: dict = {}

    def learner() -> None:
        try:
            box["result"] = _role_learner(common)
        except BaseException as e:  # noqa: BLE001 - reported below
            box["error"] = e

    thread = threading.Thread(target=learner, daemon=True)
    thread.start()
    results = [_result(p) for p in workers]
    thread.join(PROCESS_TIMEOUT_S)
    assert "error" not in box, box.get("error")
    stats = box["result"]["stats"]

    plan = L.plan_buckets(L.manifest_nbytes(manifest), bucket_bytes)
    assert len(plan) > 1
    assert [s["buckets"] for s in stats] == [len(plan)] * 2
    assert [s["bytes"] for s in stats] == [sum(L.manifest_nbytes(manifest))] * 2
    assert sorted(w["rank"] for w in results) == list(range(1, world_size))
    for w in results:
        assert w["checked"] == len(manifest["names"])
        assert [x["tensors"] for x in w["loaded"]] == [len(manifest["names"])] * 2
        assert w["mismatches"] == []
        # What each worker received sums to what the learner sent, and the two versions differ.
        sent = [s["checksum"] for s in stats]
        assert [x["checksum"] for x in w["loaded"]] == pytest.approx(sent, rel=1e-12) and sent[0] != sent[1]
        assert sent == pytest.approx([W.weights_checksum(_wire(toy_weights(v), torch.bfloat16).values())
                                      for v in common["versions"]], rel=1e-12)


def test_gloo_round_trip_between_processes(tmp_path):
    _round_trip(tmp_path, "gloo", engine_size=2)


@needs_two_gpus
def test_nccl_round_trip_between_processes(tmp_path):
    # NCCL refuses two ranks on one device: the learner takes GPU 0 here, each worker a GPU of its own.
    if torch.cuda.device_count() >= 3:
        _round_trip(tmp_path, "nccl", engine_size=2, worker_gpus=["1", "2"])
    else:
        _round_trip(tmp_path, "nccl", engine_size=1, worker_gpus=["1"])


@needs_cuda
def test_cuda_pack_and_unpack():
    weights = [(n, t.cuda()) for n, t in toy_weights(4)]
    sender = L.WeightBroadcaster(RecordingChannel("cuda"), bucket_bytes=700, wire_dtype=torch.bfloat16)
    manifest = sender.manifest(weights)
    sender.broadcast(weights, manifest)
    received = dict(A.receive_weights(ReplayChannel(sender.channel.sent, "cuda"), A.parse_manifest(manifest), 700))
    assert all(received[n].is_cuda and torch.equal(received[n], t.bfloat16()) for n, t in weights)


@needs_cuda
def test_cuda_event_wait_sees_completion():
    stream = torch.cuda.current_stream()
    x = torch.randn(1 << 20, device="cuda")
    y = x * 2
    done = torch.cuda.Event()
    done.record(stream)
    assert W._wait_until(done.query, 30)
    assert torch.equal(y.cpu(), x.cpu() * 2)


# ----------------------------------------------------------------------------------------------------------------------
# Subprocess roles
# ----------------------------------------------------------------------------------------------------------------------


def _role_learner(args: dict) -> dict:
    if args["backend"] == "nccl":
        torch.cuda.set_device(0)
    sender = L.WeightBroadcaster.connect("127.0.0.1", args["port"], args["world_size"], backend=args["backend"],
                                         timeout_s=GROUP_TIMEOUT_S, bucket_bytes=args["bucket_bytes"],
                                         wire_dtype=torch.bfloat16)
    device = sender.channel.device
    stats = []
    for version in args["versions"]:
        weights = [(n, t.to(device)) for n, t in toy_weights(version)]
        stats.append(sender.broadcast(weights, args["manifest"]))
    sender.close()
    return {"stats": stats}


def _role_worker(args: dict) -> dict:
    device = "cpu"
    if args["backend"] == "nccl":
        torch.cuda.set_device(0)
        device = "cuda:0"
    worker = FakeWorker(args["model_dir"], rank=args["rank_in_engine"], world_size=args["engine_size"], device=device)
    rank = worker.init_weight_group("127.0.0.1", args["port"], args["rank_offset"], args["world_size"],
                                    timeout_s=GROUP_TIMEOUT_S, backend=args["backend"])
    checked = worker.check_policy_weights(args["manifest"])
    loaded, mismatches = [], []
    for version in args["versions"]:
        loaded.append(worker.receive_policy_weights(args["manifest"], args["bucket_bytes"]))
        for name, tensor in _wire(toy_weights(version), torch.bfloat16).items():
            if not torch.equal(worker.loaded[name], tensor):
                mismatches.append(f"v{version} {name}")
    worker.close_weight_group()
    return {"rank": rank, "checked": checked, "loaded": loaded, "mismatches": mismatches}


if __name__ == "__main__":
    role, role_args = sys.argv[1], json.loads(sys.argv[2])
    result = {"learner": _role_learner, "worker": _role_worker}[role](role_args)
    print("RESULT " + json.dumps(result), flush=True)
