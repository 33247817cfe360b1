"""Fault injection: the schedule, the garbage a broken simulator sends and what an episode makes of it, and the pool's
delays, garbling and real kills. The pool is driven with in-process fake servers (the code under test sits above
them); the end-to-end runs with every fault on the real stack are in ``tests/test_loop_e2e.py``."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from actors.protocol import observation_token_ids
from launch.driver.faults import FaultPlan, FaultsConfig
from simulator.base import NO_INFORMATION, format_documents
from simulator.faults import GARBAGE_KINDS, LONG_REPLY_CHARS, ReplyFaults, ReplyGarbler, garbage
from simulator.pool import ServerDead, SimulatorPool
from simulator.templates import parse_simulator_output
from tests.test_simulator_pool import FakeServer, _cfg


def test_the_plan_says_which_fault_happens_at_which_step():
    plan = FaultPlan(FaultsConfig(kill_simulator_at=[2], kill_simulator_every=5, kill_rollout_at=[17],
                                  kill_learner_at=[3], corrupt_weight_load_at=4, corrupt_mode="skip"))
    assert [s for s in range(1, 31) if plan.kill_simulator(s)] == [2, 5, 10, 15, 20, 25, 30]
    assert [s for s in range(1, 31) if plan.kill_rollout(s)] == [17]
    assert [s for s in range(1, 31) if plan.kill_learner(s)] == [3]
    assert plan.weight_fault() == (0, 4, "skip")
    assert FaultPlan(FaultsConfig()).weight_fault() is None


def test_bad_fault_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="faults.corrupt_mode='flip'"):
        FaultPlan(FaultsConfig(corrupt_mode="flip"))
    with pytest.raises(ValueError, match="faults.garble_share=1.5"):
        ReplyFaults(garble_share=1.5)
    with pytest.raises(ValueError, match="garble_kinds"):
        ReplyFaults(garble_kinds=["loud"])


def test_metrics_count_the_shortfall_and_the_duplicates_of_a_step():
    plan = FaultPlan(FaultsConfig(kill_rollout_at=[1]))
    m = plan.metrics({"engines_killed": 1, "engine_restarts": 1, "rerun_groups": 3}, {"garbled": 2, "restarts": 1},
                     group_sizes=[4, 4, 3, 5], group_size=4, requested_groups=5)
    assert m["faults/rollout_kills"] == 1.0 and m["faults/rollout_restarts"] == 1.0 and m["faults/rerun_groups"] == 3
    assert m["faults/garbled_replies"] == 2.0 and m["faults/simulator_restarts"] == 1.0
    # 5 groups of 4 asked for: one came back with 3, one never came back; one has an episode too many.
    assert m["faults/lost_episodes"] == 1.0 + 4.0 and m["faults/duplicate_episodes"] == 1.0


def test_what_an_episode_reads_for_each_kind_of_garbage(tokenizer):
    """Empty: the spec's "No information available". Long: cut to the observation budget, closing tag kept. Binary
    and prose: parsed as documents like any reply, and tokenized without error."""
    rng = random.Random(0)
    max_obs = 96
    for kind in GARBAGE_KINDS:
        text = garbage(kind, rng)
        documents = parse_simulator_output(text, top_k=5)
        shown = format_documents(documents) if documents else NO_INFORMATION
        ids = observation_token_ids(shown, tokenizer, max_obs)
        decoded = tokenizer.decode(ids)
        assert len(ids) <= max_obs and decoded.rstrip().endswith("</information>"), kind
        if kind == "empty":
            assert documents == [] and NO_INFORMATION in decoded
        if kind == "long":
            assert len(text) >= LONG_REPLY_CHARS and documents and len(ids) == max_obs
        if kind == "no_docs":
            assert len(documents) == 1  # one line of prose, no "Doc i:" prefix: one document


def test_the_garbler_spoils_its_share_and_uses_every_kind_in_turn():
    garbler = ReplyGarbler(ReplyFaults(garble_share=0.25, seed=1))
    results = [garbler(f"Doc 1: reply {i}") for i in range(400)]
    assert [i for i, (_, garbled) in enumerate(results[:12]) if garbled] == [3, 7, 11]  # evenly spaced, not drawn
    spoiled = [text for text, garbled in results if garbled]
    assert len(spoiled) == 100 == garbler.garbled
    assert spoiled[0] == "" and spoiled[2].startswith("Doc 1: lorem") and "Doc" not in spoiled[3]
    untouched = [text for text, garbled in results if not garbled]
    assert all(text.startswith("Doc 1: reply") for text in untouched)
    assert ReplyGarbler(ReplyFaults())("Doc 1: x") == ("Doc 1: x", False)


def test_the_pool_garbles_and_delays_replies_and_counts_them():
    async def main():
        pool = SimulatorPool(_cfg(num_servers=1), [FakeServer("a")],
                             faults=ReplyFaults(garble_share=1.0, garble_kinds=["empty"], delay_s=0.2))
        started = time.perf_counter()
        replies = await asyncio.gather(*(pool.generate(f"q{i}") for i in range(3)))
        return replies, time.perf_counter() - started, pool.stats()

    replies, seconds, stats = asyncio.run(main())
    assert [r["text"] for r in replies] == ["", "", ""] and all(r["garbled"] for r in replies)
    assert not any(r["failed"] for r in replies)  # the server answered; what it said is garbage
    assert stats["garbled"] == 3 and seconds >= 0.2


def test_an_armed_kill_kills_that_server_once_and_the_pool_restarts_it():
    async def main():
        killed, made = [], []

        def make_server(index: int) -> FakeServer:
            made.append(FakeServer(f"new{index}"))
            return made[-1]

        def kill_server(handle: FakeServer) -> None:  # what the Ray shell does with ray.kill
            killed.append(handle.name)
            handle.fail = ServerDead(handle.name)
            handle.healthy = False

        pool = SimulatorPool(_cfg(num_servers=2), [FakeServer("a"), FakeServer("b")], make_server=make_server,
                             kill_server=kill_server)
        pool.arm_kill(0)
        replies = await asyncio.gather(*(pool.generate(f"q{i}") for i in range(4)))
        await asyncio.gather(*(s.restart_task for s in pool.slots if s.restart_task))
        return replies, killed, made, pool.stats()

    replies, killed, made, stats = asyncio.run(main())
    # One kill per arm though four calls came (the restart then disposes of the dead handle: "a" again).
    assert set(killed) == {"a"} and stats["killed"] == 1
    assert not any(r["failed"] for r in replies)  # the calls that found it dead were retried on server 1
    assert stats["restarts"] == 1 and [s.name for s in made] == ["new0"]
    with pytest.raises(ValueError, match="no simulator server 2"):
        SimulatorPool(_cfg(num_servers=2), [FakeServer("a"), FakeServer("b")]).arm_kill(2)


def test_a_checkpoint_half_written_when_the_run_died_is_skipped_for_the_one_before_it(tmp_path):
    from launch.driver.checkpoint import DRIVER_STATE, atomic_write_json, find_checkpoint

    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (root / f"step_{step}" / "deepspeed").mkdir(parents=True)
    atomic_write_json(root / "step_2" / DRIVER_STATE, {"step": 2})  # step 4 died before its driver state
    (root / "step_10").mkdir()  # newer still, and empty
    assert find_checkpoint(tmp_path, "auto") == root / "step_2"
    assert find_checkpoint(tmp_path, "off") is None
    assert find_checkpoint(tmp_path / "fresh", "auto") is None  # auto on a folder without checkpoints: start fresh
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_checkpoint(tmp_path / "fresh", str(tmp_path / "fresh"))


def _engine_reporting(ray, version: int, checksum: float | None):
    """A rollout engine as the weight sync sees it: ``weights_state.remote()`` gives an object ref of its state."""
    from types import SimpleNamespace

    return SimpleNamespace(weights_state=SimpleNamespace(
        remote=lambda: ray.put({"version": version, "checksum": checksum})))


@pytest.mark.slow
def test_an_engine_that_skipped_a_load_is_named_with_both_versions(ray_local):
    """``faults.corrupt_mode=skip``: the engine still reports the old version and checksum, so the check after the
    load stops the run even where the canary would pass (at the paper's lr an update moves logprobs by less than its
    tolerance)."""
    from types import SimpleNamespace

    from launch.driver.weight_sync import WeightSync, WeightSyncError

    sync = object.__new__(WeightSync)  # only the check, without learners: the engines' reports are what it reads
    sync.cfg = SimpleNamespace(train=SimpleNamespace(sync_timeout_s=30), cluster=SimpleNamespace(weight_sync="file"))
    sync.engines = [_engine_reporting(ray_local, 2, 41.5), _engine_reporting(ray_local, 1, None)]
    with pytest.raises(WeightSyncError, match=r"rollout engine 1 of 2 serves policy version 1 with weights checksum "
                                              r"None, but the learners published version 2 with checksum 41.5"):
        sync.check_loaded(2, 41.5)
    sync.engines = sync.engines[:1]
    sync.check_loaded(2, 41.5)  # the engine that loaded passes
