"""The rollout queue (``launch/driver/pipeline.py``) and the advantage glue (``launch/driver/advantages.py``),
without Ray.

The rollout function here is a stand-in for ``Cluster.rollout``: these tests are about what the queue does around it
(order, lookahead, the sampler snapshot, dynamic filtering); the real rollouts are covered end to end."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from actors.dataset import QAExample
from launch.driver.advantages import assign_advantages, learner_samples
from launch.driver.pipeline import RolloutQueue, informative_groups
from launch.driver.sampler import PromptSampler
from simulator.curriculum import CurriculumConfig, build_curriculum


def _trajectory(group: str, reward: float, version: int = 0, mask=(1, 1, 0, 1)):
    return SimpleNamespace(group_id=group, reward=reward, policy_version=version, prompt_ids=[5, 6],
                           response_ids=[7 + i for i in range(len(mask))], loss_mask=list(mask),
                           rollout_logprobs=[-1.0 if m else 0.0 for m in mask])


def _examples(n: int) -> list[QAExample]:
    return [QAExample(uid=f"q{i}", question=f"question {i}", golden_answers=("a",), data_source="t")
            for i in range(n)]


class _ScriptedRollout:
    """Every group of a prompt gets the rewards the script says for its uid (default: informative)."""

    def __init__(self, flat_uids=(), group_size: int = 2) -> None:
        self.flat = set(flat_uids)
        self.group_size = group_size
        self.calls: list[tuple[int, list[str], int]] = []
        self.threads: set[str] = set()

    def __call__(self, prompts, noise_prob, step, first_index):
        self.calls.append((step, [p.uid for p in prompts], first_index))
        self.threads.add(threading.current_thread().name)
        return [_trajectory(p.uid, 0.0 if p.uid in self.flat else float(k)) for p in prompts
                for k in range(self.group_size)]


def _queue(rollout, staleness=0, dynamic=False, rounds=2, steps=5, prompts=2):
    sampler = PromptSampler(_examples(40), seed=0, shuffle=False)
    curriculum = build_curriculum(CurriculumConfig(name="linear", total_steps=10, p_start=0.0, p_end=1.0))
    return RolloutQueue(rollout, sampler, curriculum, prompts, steps, staleness, timeout_s=30,
                        dynamic_filter=dynamic, filter_rounds=rounds), sampler


def test_on_policy_queue_collects_one_step_at_a_time_in_order():
    rollout = _ScriptedRollout()
    queue, _ = _queue(rollout)
    for step in (1, 2):
        queue.fill(step)
        batch, _ = queue.take(step)
        queue.wait_idle()
        assert batch.step == step and batch.prompt_uids == [f"q{2 * step - 2}", f"q{2 * step - 1}"]
        assert batch.sampler_state["position"] == 2 * step
    assert [c[0] for c in rollout.calls] == [1, 2]  # nothing was rolled out ahead
    queue.close()


def test_lookahead_keeps_k_steps_in_flight_and_snapshots_the_sampler_per_step():
    rollout = _ScriptedRollout()
    queue, sampler = _queue(rollout, staleness=2)
    queue.fill(1)
    batch, _ = queue.take(1)
    queue.wait_idle()
    assert [c[0] for c in rollout.calls] == [1, 2, 3]  # steps 2 and 3 rolled out while step 1 trained
    assert sampler.position == 6  # the live sampler is past the prefetched steps...
    assert batch.sampler_state["position"] == 2  # ...but step 1's checkpoint must say 2
    assert rollout.threads == {"rollout_0"}  # one background collector, so the draws stay in step order
    queue.fill(2)
    queue.wait_idle()
    assert [c[0] for c in rollout.calls] == [1, 2, 3, 4]  # one more step ahead, not two
    queue.close()


def test_noise_probability_follows_the_curriculum_per_step():
    queue, _ = _queue(_ScriptedRollout(), staleness=1)
    queue.fill(1)
    first, _ = queue.take(1)
    queue.fill(2)
    second, _ = queue.take(2)
    assert (first.noise_prob, second.noise_prob) == pytest.approx((0.1, 0.2))  # linear 0 -> 1 over 10 steps
    queue.close()


def test_informative_groups_drop_groups_with_equal_rewards():
    trajectories = [_trajectory("a", 1.0), _trajectory("a", 1.0), _trajectory("b", 0.0), _trajectory("b", 0.5)]
    kept, rolled, n_kept = informative_groups(trajectories)
    assert (rolled, n_kept) == (2, 1) and {t.group_id for t in kept} == {"b"}


def test_dynamic_filter_refills_with_fresh_prompts_and_logs_the_pass_rate():
    rollout = _ScriptedRollout(flat_uids={"q0", "q2"})
    queue, _ = _queue(rollout, dynamic=True, prompts=2)
    queue.fill(1)
    batch, _ = queue.take(1)
    # q0 flat -> refill 1 prompt (q2, flat) -> refill 1 prompt (q3): 2 informative groups of 4 rolled.
    assert [c[1] for c in rollout.calls] == [["q0", "q1"], ["q2"], ["q3"]]
    assert [c[2] for c in rollout.calls] == [0, 2, 3]  # each refill's episodes get seeds of their own
    assert {t.group_id for t in batch.trajectories} == {"q1", "q3"}
    assert (batch.groups_rolled, batch.groups_kept, batch.rounds) == (4, 2, 3)
    assert batch.pass_rate == pytest.approx(0.5)
    assert batch.sampler_state["position"] == 4
    # The step's score is every rolled episode's (rewards 0,0 | 0,1 | 0,0 | 0,1), not the kept groups' (0,1 | 0,1).
    assert batch.rolled_rewards == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    # ... and the rollout metrics (reward by hop count, searches) describe every rolled group too, the dropped ones in.
    assert [t.group_id for t in batch.rolled_trajectories] == ["q0", "q0", "q1", "q1", "q2", "q2", "q3", "q3"]
    assert batch.signal_share == pytest.approx(0.5)  # 2 of the 4 groups rolled had rewards that differ
    assert batch.score_mean == pytest.approx(0.25)
    assert sum(t.reward for t in batch.trajectories) / len(batch.trajectories) == pytest.approx(0.5)
    queue.close()


def test_dynamic_filter_gives_up_after_its_rounds_and_keeps_the_batch():
    rollout = _ScriptedRollout(flat_uids={f"q{i}" for i in range(40)})
    queue, _ = _queue(rollout, dynamic=True, rounds=1)
    queue.fill(1)
    batch, _ = queue.take(1)
    assert len(rollout.calls) == 2 and batch.groups_kept == 0
    assert len(batch.trajectories) == 4  # the first round's groups: advantages 0, but the step still runs
    queue.close()


def test_rollout_errors_surface_in_take():
    def broken(prompts, noise_prob, step, first_index):
        raise TimeoutError("rollout of step 1 did not finish")

    queue, _ = _queue(broken)
    queue.fill(1)
    queue.wait_idle()  # waiting does not raise...
    with pytest.raises(TimeoutError, match="step 1"):  # ...taking the batch does
        queue.take(1)
    queue.close()


def test_ppo_advantages_by_hand_with_zero_values_and_kl_in_reward():
    """Two episodes, mask [1, 1, 0, 1] (an observation gap). V = 0, γ = λ = 1, β = 0.5, old − ref = 0.2 per token.

    Token rewards: −0.1 on every model token, plus the score on the last model token. GAE with V = 0 is the
    return-to-go over model tokens: episode 1 (score 1): [0.7, 0.8, –, 0.9]; episode 2 (score 0): [−0.3, −0.2, –, −0.1].
    Whitened over the 6 model tokens (mean 0.3, squared deviations summing to 1.54, unbiased std sqrt(1.54 / 5)), and
    the returns are the raw GAE values."""
    trajectories = [_trajectory("g", 1.0), _trajectory("g", 0.0)]
    samples = learner_samples(trajectories)
    for s in samples:
        s.old_values = [0.0] * 4
        s.old_logprobs = list(s.rollout_logprobs)  # as the driver sets them (old_logprobs_source)
        s.ref_logprobs = [lp - 0.2 if m else 0.0 for lp, m in zip(s.old_logprobs, s.loss_mask)]
    metrics = assign_advantages(samples, trajectories, "ppo", kl_in_reward_coef=0.5)
    assert samples[0].returns == pytest.approx([0.7, 0.8, 0.0, 0.9])
    assert samples[1].returns == pytest.approx([-0.3, -0.2, 0.0, -0.1])
    std = (1.54 / 5) ** 0.5
    assert samples[0].advantages == pytest.approx([0.4 / std, 0.5 / std, 0.0, 0.6 / std], rel=1e-5)
    assert samples[1].advantages == pytest.approx([-0.6 / std, -0.5 / std, 0.0, -0.4 / std], rel=1e-5)
    assert metrics["critic/reward_kl"] == pytest.approx(0.2)
    assert metrics["critic/advantages/mean"] == pytest.approx(0.0, abs=1e-6)


def test_rloo_and_grpo_advantages_reach_the_samples_and_skip_observations():
    trajectories = [_trajectory("g", 1.0), _trajectory("g", 0.0), _trajectory("g", 0.5)]
    samples = learner_samples(trajectories)
    assign_advantages(samples, trajectories, "rloo")
    # A_i = R_i − mean of the others: 1 − 0.25, 0 − 0.75, 0.5 − 0.5.
    expected = [[0.75, 0.75, 0.0, 0.75], [-0.75, -0.75, 0.0, -0.75], [0.0, 0.0, 0.0, 0.0]]
    for sample, row in zip(samples, expected):
        assert sample.advantages == pytest.approx(row)
    # The engine's logprobs ride along as the behaviour policy; π_old is the driver's to set.
    assert samples[0].rollout_logprobs == [-1.0, -1.0, 0.0, -1.0] and samples[0].old_logprobs == []
    assert samples[0].returns == []


def test_kl_in_reward_is_refused_for_sequence_estimators():
    trajectories = [_trajectory("g", 1.0), _trajectory("g", 0.0)]
    with pytest.raises(ValueError, match="grpo has no per-token rewards"):
        assign_advantages(learner_samples(trajectories), trajectories, "grpo", kl_in_reward_coef=0.1)


def test_group_ids_are_unique_per_draw_when_an_epoch_wraps_inside_a_step():
    """3 questions, 2 per step: step 2 draws the last question of epoch 0 and the first of epoch 1, and over a few
    steps some step draws one question twice. Each draw is its own group, so GRPO never merges two into one of 2G."""
    from launch.driver.sampler import episode_requests

    sampler = PromptSampler(_examples(3), seed=0, shuffle=True)  # step 2 draws q1 twice
    repeated = False
    for step in range(1, 9):
        prompts = sampler.next(2)
        requests = episode_requests(prompts, seed=0, step=step)
        repeated |= len({p.uid for p in prompts}) < len(prompts)
        assert len({r.group_id for r in requests}) == len(prompts)
        assert len({r.seed for r in requests}) == len(prompts)
        assert [r.question for r in requests] == [p.question for p in prompts]
    assert repeated  # the case this guards against happened
    # A refill round's requests number on from the step's earlier ones.
    first = episode_requests(_examples(2), seed=0, step=1)
    refill = episode_requests(_examples(2), seed=0, step=1, first_index=2)
    assert not {r.group_id for r in first} & {r.group_id for r in refill}
    assert not {r.seed for r in first} & {r.seed for r in refill}


def test_signal_share_without_the_filter_counts_groups_whose_rewards_differ():
    queue, _ = _queue(_ScriptedRollout(flat_uids={"q0"}), prompts=2)
    queue.fill(1)
    batch, _ = queue.take(1)
    assert (batch.groups_rolled, batch.groups_informative, batch.groups_kept) == (2, 1, 2)
    assert batch.signal_share == pytest.approx(0.5) and len(batch.trajectories) == 4  # nothing dropped
    queue.close()


def test_rollout_metrics_give_the_reward_per_data_source():
    from actors.trajectory import EpisodeStats
    from launch.driver.metrics import rollout_metrics

    def episode(source: str, reward: float, finish: str = "answer", searches: int = 1):
        return SimpleNamespace(reward=reward, data_source=source, response_ids=[1, 2], loss_mask=[1, 1],
                               stats=EpisodeStats(turns=2, searches=searches, valid_actions=2, answered=True,
                                                  finish_reason=finish, generated_tokens=2))

    metrics = rollout_metrics([episode("synthetic_1hop", 1.0), episode("synthetic_1hop", 0.5),
                               episode("synthetic_2hop", 0.0, finish="error", searches=2)])
    assert metrics["critic/score/synthetic_1hop"] == pytest.approx(0.75)
    assert metrics["critic/score/synthetic_2hop"] == 0.0
    assert metrics["search/calls_per_episode/synthetic_1hop"] == 1.0
    assert metrics["search/calls_per_episode/synthetic_2hop"] == 2.0
    assert metrics["critic/score/mean"] == pytest.approx(0.5) and metrics["episode/errors"] == 1.0


def test_answer_in_first_results_counts_the_simulators_shortcut_by_draw():
    from actors.trajectory import EpisodeStats
    from launch.driver.metrics import answer_in_first_results

    def episode(source: str, first_docs: list[str], noisy: bool | None):
        stats = EpisodeStats(searches=2, documents=[first_docs, ["Karth is in Velmor."]], noisy=[noisy, noisy])
        return SimpleNamespace(data_source=source, golden_answers=("Velmor",), stats=stats)

    metrics = answer_in_first_results([
        episode("synthetic_2hop", ["Tavo was born in Karth."], noisy=False),       # the real first hop: no answer
        episode("synthetic_2hop", ["Tavo was born in Karth, in Velmor."], noisy=False),  # the shortcut
        episode("synthetic_2hop", ["velmor is far away"], noisy=True),            # case-insensitive hit
        episode("synthetic_1hop", ["nothing"], noisy=None),                       # a real engine: no draw
        SimpleNamespace(data_source="synthetic_1hop", golden_answers=("x",), stats=EpisodeStats()),  # no search
    ])
    assert metrics == {"search/answer_in_first_results/synthetic_1hop": 0.0,
                       "search/answer_in_first_results/synthetic_2hop": pytest.approx(2 / 3),
                       "search/answer_in_first_results/synthetic_2hop/noisy": 1.0,
                       "search/answer_in_first_results/synthetic_2hop/useful": 0.5}


def test_a_run_without_signal_warns_once_and_says_why(capsys):
    from launch.driver.metrics import Progress

    progress = Progress(total=6)
    row = {"critic/score/mean": 0.0, "search/noise_prob": 0.0, "search/calls_per_episode": 1.0,
           "data/signal_share": 0.0, "episode/valid_action_share": 1.0, "timing_s/step": 1.0, "timing_s/gen": 0.5,
           "timing_s/score": 0.1, "timing_s/train": 0.3, "timing_s/sync": 0.1, "actor/entropy": 0.012}
    for step in range(1, 6):
        progress.show(step, row)
    progress.close()
    out = capsys.readouterr().out
    assert out.count("signal 0.00") == 5 and out.count("entropy 0.012") == 5
    assert out.count("warning:") == 1 and "data/signal_share 0" in out and "0.012 nats/token" in out
    assert "train.group_size" in out


def test_a_skipped_update_shows_no_entropy_and_the_warning_gives_the_last_measured(capsys):
    """A step with no signal skips its update (train.skip_update_without_signal), which measures no entropy: the line
    says so rather than printing nan, and the warning quotes the last update's entropy."""
    from launch.driver.metrics import Progress

    progress = Progress(total=6)
    row = {"critic/score/mean": 0.5, "search/noise_prob": 0.0, "search/calls_per_episode": 1.0,
           "data/signal_share": 0.25, "episode/valid_action_share": 1.0, "timing_s/step": 1.0, "timing_s/gen": 0.5,
           "timing_s/score": 0.1, "timing_s/train": 0.3, "timing_s/sync": 0.1, "actor/entropy": 0.044,
           "train/update_skipped": 0.0}
    progress.show(1, row)
    skipped = {k: v for k, v in row.items() if k != "actor/entropy"} | {"data/signal_share": 0.0,
                                                                        "train/update_skipped": 1.0}
    for step in range(2, 5):
        progress.show(step, skipped)
    progress.close()
    out = capsys.readouterr().out
    assert "entropy 0.044" in out and out.count("entropy - (update skipped)") == 3 and "nan" not in out
    assert out.count("warning:") == 1 and "0.044 nats/token at its last update" in out


@pytest.mark.parametrize("engines", [1, 2, 3, 5])
def test_rollout_group_shards_round_robin_and_unshards_in_request_order(engines):
    from actors.group import shard, unshard

    for count in range(0, 12):
        items = list(range(count))
        parts = shard(items, engines)
        assert len(parts) == engines and sorted(x for p in parts for x in p) == items
        assert all(x % engines == k for k, p in enumerate(parts) for x in p)  # request k on engine k mod N
        assert unshard(parts) == items
