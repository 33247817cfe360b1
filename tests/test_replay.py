"""Replay of rare successes (``launch/driver/replay.py``) and its place in the rollout queue, without Ray.

The rollout function is a stand-in for ``Cluster.rollout`` that numbers its groups the way the real one does
(``launch.driver.sampler.group_ids``); the replay is what is under test."""

from __future__ import annotations

import json

import pytest

from actors.dataset import QAExample
from actors.trajectory import EpisodeStats, Trajectory
from launch.driver.advantages import assign_advantages, learner_samples
from launch.driver.pipeline import RolloutQueue
from launch.driver.replay import ReplayConfig, SuccessReplay, grounded
from launch.driver.sampler import PromptSampler, group_ids
from simulator.curriculum import CurriculumConfig, build_curriculum

GOLD = "Veipouthrous"


def _episode(group_id: str, k: int, reward: float, docs=("Krevas is a city in Veipouthrous.",)) -> Trajectory:
    return Trajectory(uid=f"{group_id}/{k}", group_id=group_id, prompt_ids=[5, 6], response_ids=[7, 8, 9, 10],
                      loss_mask=[1, 1, 0, 1], rollout_logprobs=[-1.0, -1.0, 0.0, -1.0], reward=reward,
                      golden_answers=(GOLD,), data_source="synthetic_2hop", policy_version=0, noise_prob=0.0,
                      stats=EpisodeStats(searches=2, documents=[list(docs)]))


def _example(i: int) -> QAExample:
    return QAExample(uid=f"q{i}", question=f"question {i}", golden_answers=(GOLD,), data_source="synthetic_2hop")


def _group(group_id: str, rewards, **kw) -> list[Trajectory]:
    return [_episode(group_id, k, r, **kw) for k, r in enumerate(rewards)]


def test_grounded_needs_the_answer_in_the_retrieved_documents():
    assert grounded(_episode("g", 0, 1.0))
    assert not grounded(_episode("g", 0, 1.0, docs=("Krevas is a city.",)))
    assert not grounded(_episode("g", 0, 1.0, docs=()))


@pytest.mark.parametrize("rewards, docs, cfg, kept", [
    ([0.0, 0.0, 1.0, 0.0], None, {}, True),                          # one success among failures: rare, kept
    ([1.0, 1.0, 1.0, 0.0], None, {}, False),                         # mean 0.75 > 0.5: not rare
    ([0.0, 0.5, 0.0, 0.0], None, {}, False),                         # partial credit is no success at min_reward 1
    ([0.0, 0.5, 0.0, 0.0], None, {"min_reward": 0.5}, True),
    ([0.0, 1.0, 0.0, 0.0], ("Krevas is a city.",), {}, False),       # a right guess, the answer nowhere retrieved
    ([0.0, 1.0, 0.0, 0.0], ("Krevas is a city.",), {"grounded": False}, True),
])
def test_which_successes_are_kept(rewards, docs, cfg, kept):
    replay = SuccessReplay(ReplayConfig(prompts=1, **cfg))
    replay.draw(4)
    kw = {} if docs is None else {"docs": docs}
    replay.observe(_group("q0@1.0", rewards, **kw), {"q0@1.0": _example(0)}, {})
    assert (list(replay.entries) == ["q0"]) is kept
    if kept:
        assert replay.entries["q0"].trajectory.reward == max(rewards)
        assert replay.metrics()["replay/added"] == 1.0


def _replay_with_entry(**cfg) -> SuccessReplay:
    replay = SuccessReplay(ReplayConfig(prompts=1, **cfg))
    replay.draw(4)
    replay.observe(_group("q0@1.0", [0.0, 1.0, 0.0, 0.0]), {"q0@1.0": _example(0)}, {})
    return replay


def test_a_replayed_episode_joins_the_new_group_and_gives_it_advantages():
    replay = _replay_with_entry()
    [entry] = replay.draw(4)
    fresh = _group("q0@2.0", [0.0, 0.0, 0.0, 0.0])
    out = replay.observe(fresh, {"q0@2.0": _example(0)}, {"q0@2.0": entry})
    assert len(out) == 5
    rejoined = out[-1]
    assert rejoined.group_id == "q0@2.0" and rejoined.reward == 1.0
    assert rejoined.uid == "q0@1.0/1/replay1" and len({t.uid for t in out}) == 5
    assert rejoined.response_ids == entry.trajectory.response_ids
    # Without the replay every advantage of this group is 0; with it, GRPO over 5 rewards [0, 0, 0, 0, 1]:
    # mean 0.2, unbiased std sqrt(0.2) = 0.4472, so the success gets 0.8 / 0.4472 = 1.789 and each failure -0.447.
    samples = learner_samples(out)
    assign_advantages(samples, out, "grpo")
    assert samples[-1].advantages[0] == pytest.approx(0.8 / 0.2 ** 0.5, rel=1e-4)
    assert samples[0].advantages[0] == pytest.approx(-0.2 / 0.2 ** 0.5, rel=1e-4)
    assert replay.metrics()["replay/groups"] == 1.0 and "q0" in replay.entries  # still rare: it stays


def test_an_entry_leaves_once_learned_or_used_up():
    replay = _replay_with_entry()
    [entry] = replay.draw(4)
    replay.observe(_group("q0@2.0", [1.0, 1.0, 1.0, 0.0]), {"q0@2.0": _example(0)}, {"q0@2.0": entry})
    assert not replay.entries and replay.metrics()["replay/learned"] == 1.0
    assert replay.metrics()["replay/fresh_success_share"] == 0.75

    replay = _replay_with_entry(max_uses=2)
    for step in (2, 3):
        [entry] = replay.draw(4)
        gid = f"q0@{step}.0"
        replay.observe(_group(gid, [0.0] * 4), {gid: _example(0)}, {gid: entry})
    assert not replay.entries and replay.metrics()["replay/retired"] == 1.0


def test_counts_add_up_over_the_rounds_of_a_step_and_start_again_at_the_next_draw():
    replay = SuccessReplay(ReplayConfig(prompts=1))
    replay.draw(4)
    replay.observe(_group("q0@1.0", [0.0, 1.0]), {"q0@1.0": _example(0)}, {})
    replay.observe(_group("q1@1.1", [1.0, 0.0]), {"q1@1.1": _example(1)}, {})  # a refill round of the same step
    assert replay.metrics()["replay/added"] == 2.0
    replay.draw(4)
    assert replay.metrics()["replay/added"] == 0.0 and replay.metrics()["replay/buffer"] == 2.0


def test_the_oldest_entry_leaves_a_full_buffer_and_draws_are_oldest_first():
    replay = SuccessReplay(ReplayConfig(prompts=2, capacity=2))
    replay.draw(4)
    for i in range(3):
        gid = f"q{i}@1.{i}"
        replay.observe(_group(gid, [0.0, 1.0]), {gid: _example(i)}, {})
    assert list(replay.entries) == ["q1", "q2"]
    assert [e.example.uid for e in replay.draw(4)] == ["q1", "q2"]
    assert [e.example.uid for e in replay.draw(1)] == ["q1"]  # never more than the step's prompts


def test_the_buffer_survives_a_json_round_trip():
    replay = _replay_with_entry()
    replay.entries["q0"].uses = 3
    state = json.loads(json.dumps(replay.state_dict()))
    restored = SuccessReplay(ReplayConfig(prompts=1))
    restored.load_state_dict(state)
    entry = restored.entries["q0"]
    assert entry.uses == 3 and entry.example == _example(0)
    assert entry.trajectory == replay.entries["q0"].trajectory


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="replay.max_uses=0"):
        SuccessReplay(ReplayConfig(prompts=1, max_uses=0))


class _Rollout:
    """Groups numbered as ``Cluster.rollout`` numbers them; question q1 succeeds once in its first group only."""

    def __init__(self, group_size: int = 4) -> None:
        self.group_size = group_size
        self.calls: list[list[str]] = []

    def __call__(self, prompts, noise_prob, step, first_index):
        self.calls.append([p.uid for p in prompts])
        out = []
        for p, gid in zip(prompts, group_ids(prompts, step, first_index)):
            lucky = p.uid == "q1" and step == 1
            out += [_episode(gid, k, 1.0 if lucky and k == 0 else 0.0) for k in range(self.group_size)]
        return out


def test_the_queue_brings_a_rare_success_back_with_its_question():
    rollout = _Rollout()
    sampler = PromptSampler([_example(i) for i in range(20)], seed=0, shuffle=False)
    curriculum = build_curriculum(CurriculumConfig(name="constant", total_steps=5, p_start=0.0, p_end=0.0))
    queue = RolloutQueue(rollout, sampler, curriculum, 2, 5, 0, timeout_s=30,
                         replay=SuccessReplay(ReplayConfig(prompts=1)))
    batches = []
    for step in (1, 2):
        queue.fill(step)
        batches.append(queue.take(step)[0])
        queue.wait_idle()
    queue.close()
    first, second = batches
    assert rollout.calls == [["q0", "q1"], ["q1", "q2"]]  # q1 comes back first, then the sampler goes on
    assert first.replay_metrics["replay/added"] == 1.0 and first.replay_state["entries"][0]["example"]["uid"] == "q1"
    assert len(second.trajectories) == 2 * 4 + 1
    replayed = [t for t in second.trajectories if "/replay" in t.uid]
    assert [t.group_id for t in replayed] == ["q1@2.0"] and replayed[0].reward == 1.0
    assert second.replayed_uids == {replayed[0].uid} and len(second.rolled_trajectories) == 8
    assert len(second.rolled_rewards) == 8 and sum(second.rolled_rewards) == 0.0  # the policy's own score: 0
    assert second.signal_share == 0.5  # the replayed group differs; q2's does not
    assert sampler.state_dict()["position"] == 3
