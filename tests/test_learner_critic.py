"""The PPO critic on real DeepSpeed (CPU) with tiny-llama: hand-checked first loss, learning, masking, the value clip
and a checkpoint round trip. Runs in a fresh interpreter (torch.distributed state is per process)."""

from __future__ import annotations

import sys

import pytest

from tests.test_learner_policy import make_samples, run_scenario

RETURN = 1.0
OBSERVATION_RETURN = 100.0  # on loss_mask 0 tokens: would dominate every statistic if it leaked in


def _with_targets(samples, values):
    for s, v in zip(samples, values):
        s.old_values = v
        s.returns = [RETURN if m else OBSERVATION_RETURN for m in s.loss_mask]
    return samples


def scenario_critic(out_dir: str) -> dict:
    from launch.assets import model_path
    from learners.config import LearnerConfig
    from learners.critic import CriticCore

    critic = CriticCore(model_path("tiny-llama"), LearnerConfig(bf16=False, lr=1e-2, warmup_steps=0,
                                                                   micro_batch_tokens=48, value_clip=0.05))
    samples = make_samples()
    initial = critic.values(samples)
    trace = []
    for _ in range(6):
        metrics = critic.train_step(_with_targets(samples, critic.values(samples)))
        trace.append(metrics)
    final = critic.values(samples)
    # Old values left at the initial zeros: every value has moved more than value_clip since, so the clipped branch
    # V_old + clip(V − V_old) = 0.05 sets each token's loss at ½ (0.05 − 1)² or above.
    stale = critic.train_step(_with_targets(samples, initial))
    model_values = [v for row, s in zip(final, samples) for v, m in zip(row, s.loss_mask) if m]

    critic.save_checkpoint(f"{out_dir}/ckpt")
    saved = critic.values(samples)
    critic.train_step(_with_targets(samples, saved))
    critic.load_checkpoint(f"{out_dir}/ckpt")
    return {
        "initial_max_abs": max(abs(v) for row in initial for v in row),
        "lens_ok": [len(row) for row in initial] == [s.response_len for s in samples],
        "first": trace[0],
        "losses": [m["critic/value_loss"] for m in trace],
        "stale": stale,
        "final_model_value_mean": sum(model_values) / len(model_values),
        "restored": critic.values(samples) == saved,
    }


SCENARIOS = {"critic": scenario_critic}


@pytest.mark.slow
def test_critic_learns_returns_on_model_tokens_only(tmp_path, tiny_llama_path):
    result = run_scenario("tests.test_learner_critic", "critic", tmp_path)
    assert result["lens_ok"] and result["initial_max_abs"] == 0.0  # the value head starts at zero
    first = result["first"]
    # V = 0 and R = 1 on every model token: L = ½ (0 − 1)² = 0.5, and the returns' mean ignores the observations' 100.
    assert first["critic/value_loss"] == pytest.approx(0.5, abs=1e-6)
    assert first["critic/returns_mean"] == pytest.approx(RETURN)
    losses = result["losses"]
    assert losses[-1] < 0.5 * losses[0], losses  # it learns
    assert 0.2 < result["final_model_value_mean"] < 1.5
    assert result["stale"]["critic/value_clip_frac"] > 0.9
    assert result["stale"]["critic/value_loss"] >= 0.5 * (0.05 - 1.0) ** 2 - 1e-6
    assert result["restored"]


if __name__ == "__main__":
    import json

    print("RESULT " + json.dumps(SCENARIOS[sys.argv[1]](sys.argv[2])), flush=True)
