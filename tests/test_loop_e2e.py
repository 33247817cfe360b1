"""The loop at full strength, end to end on the real stack with tiny-llama: PPO with its critic, REINFORCE++,
asynchronous training with bounded staleness stopped by Ctrl-C, and exact resume after the driver is killed. (RLOO
runs in ``tests/test_faults_e2e.py``, as the first step of the spoiled-load run.)"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT
from tests.test_train_e2e import TINY_RUN, _train

# BM25 instead of the simulator pool: these tests are about the learner side, and one fewer vLLM engine halves a run.
LEAN = [*TINY_RUN, "search=bm25", "train.export_hf=false", "logger.wandb.mode=disabled", "train.throughput_probe=false"]
MINI_BATCHES = ["learner.mini_batch_size=2"]  # the batch of 2 prompts x 2 samples in two optimizer steps


def _finite(row: dict, *keys: str) -> bool:
    return all(math.isfinite(row[k]) for k in keys)


@pytest.mark.slow
def test_ppo_trains_policy_and_critic(tmp_path):
    """Two PPO steps. The probe reward (even-token share) varies for a random policy, so GAE has something to learn;
    tiny-llama never answers a question right, and F1 would give every token a return of 0."""
    _, rows = _train(tmp_path, *LEAN, "train.algorithm=ppo", "train.total_steps=2",
                     "rollout.episode.reward_metric=even_token_share")
    for row in rows:
        assert _finite(row, "actor/pg_loss", "actor/grad_norm", "critic/value_loss", "critic/grad_norm",
                       "critic/reward_kl", "rollout/engine_vs_learner_logprob_gap")
        assert row["critic/grad_norm"] > 0.0 and row["actor/grad_norm"] > 0.0
        assert row["critic/lr"] == pytest.approx(1e-5)  # the critic group, not the policy's learner=tiny
        # The KL in the reward reads π_old, so the learners recomputed it: the ratio of an on-policy step is 1.
        assert row["actor/clip_frac"] == 0.0 and abs(row["actor/ratio_mean"] - 1.0) < 1e-4
        # Whitened GAE over model tokens: mean 0 on the tokens it covers.
        assert abs(row["critic/advantages/mean"]) < 1e-5
        # The passes before the update (reference, old logprobs, values) are timed apart from it.
        assert 0.0 < row["timing_s/score"] < row["timing_s/step"]
    # The KL went into the reward (train.kl_penalty=auto is `reward` for PPO): 0 while π_old is the reference (step
    # 1, both in fp32), and not once the policy has moved.
    assert abs(rows[0]["critic/reward_kl"]) < 1e-5 and rows[1]["critic/reward_kl"] != 0.0
    checkpoint = tmp_path / "run" / "checkpoints" / "step_2"
    assert (checkpoint / "critic").is_dir() and (checkpoint / "deepspeed").is_dir()


@pytest.mark.slow
def test_async_training_lags_at_most_one_version_and_ctrl_c_checkpoints(tmp_path):
    """max_staleness=1: the rollout of step k+1 runs while step k trains, with the weights of step k−1.

    Versions count updates: the on-policy version for step k is k−1 (the weights before its update), so batches of
    step k come from version k−1 or k−2, and after the first step always from k−2 (the overlap happened).

    The run is asked for 50 steps and stopped with Ctrl-C after its fourth: it finishes the step it is in, writes a
    checkpoint, drops the rollout it had prefetched, and exits 0."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch.train", *LEAN, "train.max_staleness=1", "train.total_steps=50",
           "learner.tis_cap=2.0", f"data.dir={tmp_path / 'world'}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 900
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 4):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run ended or stalled before step 4: " + proc.communicate()[1][-3000:])
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = len(rows)
    assert 4 <= steps < 50 and f"interrupted after step {steps}" in out
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    state = json.loads((run_dir / "checkpoints" / f"step_{steps}" / "driver_state.json").read_text())
    # The checkpoint holds the data position of its own step, not of the step prefetched after it.
    assert state["step"] == steps and state["sampler"]["position"] == 2 * steps
    assert (run_dir / "checkpoints" / f"step_{steps}" / "deepspeed").is_dir()

    rows = rows[:4]
    batches = [json.loads(line) for line in (run_dir / "batches.jsonl").read_text().splitlines()]
    for row, batch in zip(rows, batches):
        k = row["step"]
        assert set(batch["policy_versions"]) <= {k - 2, k - 1} and min(batch["policy_versions"]) >= 0
        assert row["async/staleness_max"] <= 1
        assert _finite(row, "actor/ratio_mean", "actor/ratio_max", "actor/tis_weight")
        # TIS: the ratio is taken against logprobs the learner recomputed, so it is 1 before the update.
        assert row["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-4)
        assert 0.0 < row["actor/tis_weight"] <= 2.0
    assert [r["async/staleness_mean"] for r in rows[1:]] == [1.0, 1.0, 1.0]


def _prompts(run_dir) -> dict[int, list[str]]:
    lines = (run_dir / "batches.jsonl").read_text().splitlines()
    return {row["step"]: row["prompts"] for row in map(json.loads, lines)}


# Two data-parallel learners (gloo) through update, sync, canary, checkpoint, kill and resume; each RL step is two
# mini-batches of 2 trajectories, each sharded over both learners. The weights reach the engine by the GPU path's
# protocol over gloo: learner rank 0 broadcasts, every engine worker receives in place, and a resumed run opens the
# group anew.
TWO_LEARNERS = ["cluster.learners=2", "train.algorithm=reinforce_pp", *MINI_BATCHES, "cluster.weight_sync=gloo",
                "cluster.weight_sync_bucket_mb=1"]


@pytest.mark.slow
def test_killed_driver_resumes_exactly(tmp_path):
    """Two learners. Kill -9 the driver (and everything it started) during step 4, after the step-2 checkpoint;
    resume=auto reruns steps 3 and 4 with the same noise probability and prompts, and metrics.jsonl reads 1, 2, 3, 4.

    That two learners make one learner's update on the same batch is checked where the batch can be the same:
    ``tests/test_learner_policy.py`` (the rollouts of two runs differ, vLLM's sampling RNG being shared by the
    engine's batch)."""
    run_dir = tmp_path / "run"
    args = [*LEAN, *TWO_LEARNERS, "train.total_steps=4", "train.save_every=2", "curriculum=linear",
            f"data.dir={tmp_path / 'world'}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "launch.train", *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 900
    try:
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the run ended or stalled before step 3: " + (proc.stdout.read() or "")[-3000:])
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started, at once
        proc.wait(timeout=60)
    killed = [json.loads(line) for line in metrics.read_text().splitlines()]
    killed_prompts = _prompts(run_dir)
    assert [r["step"] for r in killed][:3] == [1, 2, 3]
    # REINFORCE++ in mini-batches of 2 in a batch of 4: two optimizer steps, so the learners recomputed π_old first.
    # (The gap to the engine's logprobs is large here: guided decoding reports the grammar-masked distribution's.)
    assert all(r["actor/optimizer_steps"] == 2.0 and r["sync/canary_gap"] < 0.01 for r in killed)
    assert all(math.isfinite(r["rollout/engine_vs_learner_logprob_gap"]) and "critic/value_loss" not in r
               for r in killed)
    assert all(r["sync/canary_moved"] > 0.0 for r in killed)  # each broadcast reached the engine
    assert not (run_dir / "checkpoints" / "step_4").exists()

    result, rows = _train(tmp_path, *LEAN, *TWO_LEARNERS, "train.total_steps=4", "train.save_every=2",
                          "curriculum=linear", "resume=auto")
    assert "resumed from" in result.stdout and "step_2" in result.stdout
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # no gap, no repeat
    assert rows[:2] == killed[:2]  # the rows before the checkpoint are untouched
    assert rows[2]["search/noise_prob"] == killed[2]["search/noise_prob"] > 0.0
    resumed_prompts = _prompts(run_dir)
    assert resumed_prompts[3] == killed_prompts[3]
    assert resumed_prompts[4] != resumed_prompts[3]
    # The learners continued from the step-2 weights and optimizer: the rerun step 3 sees the same rollouts (seeded)
    # from the same engine weights, so it computes the same loss.
    assert rows[2]["actor/pg_loss"] == pytest.approx(killed[2]["actor/pg_loss"], rel=1e-4, abs=1e-6)
