"""End to end on the real stack (Ray + vLLM CPU + DeepSpeed CPU) with tiny-llama and real BM25 search.

A random tiny model never writes ``</search>`` by chance, so the first turn is constrained to a search with vLLM's
structured outputs (``rollout.guided_first_turn_regex``); everything after it is sampled freely.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from actors.protocol import INVALID_ACTION_MESSAGE
from tests.conftest import REPO_ROOT

GUIDED_SEARCH = "<search> [a-z]{2,8} [a-z]{2,8} </search>"
TINY_RUN = [
    "model=tiny_llama", "learner=tiny", "simulator=tiny", "train.total_steps=2", "train.prompts_per_step=2",
    "train.group_size=2", "rollout.episode.max_tokens_per_turn=24", "rollout.episode.max_obs_tokens=96",
    f"rollout.guided_first_turn_regex='{GUIDED_SEARCH}'", "data.synthetic_entities=32", "logger.wandb.mode=offline",
    "train.warmup=off",
]
# The cold start as `make train` runs it, shrunk: a few SFT steps on scripted demonstrations before RL.
TINY_WARMUP = ["train.warmup=auto", "rollout.episode.max_tokens_per_turn=64",  # the expert's turns need ~50
               "warmup.demonstrations=8", "warmup.steps=2", "warmup.batch_size=4",
               "warmup.lr=1e-3", "warmup.cache=false"]
# A probe reward a random policy already varies on: the share of even token ids among its own tokens. tiny-llama is
# uniform over its 49k-token vocabulary (entropy 10.79 nats), so over free text no token is ever sampled twice and
# nothing is learnable in a short run; guided decoding restricts each turn to the few tokens spelling [abc]+, among
# which the estimator must shift probability toward the even ids. Measured over 20 steps (seed 0, lr 1e-2): steps
# 1-3 mean 0.67 under both GRPO and REINFORCE++, steps 5-8 mean 0.91 and 1.00, and the later steps add nothing to the
# proof, so the sweep runs 8.
PROBE_STEPS = 8
PROBE_RUN = [
    "model=tiny_llama", "learner=tiny", "search=bm25", "train.warmup=off", f"train.total_steps={PROBE_STEPS}",
    "train.prompts_per_step=8", "train.group_size=8", "rollout.episode.max_turns=0",
    "rollout.episode.max_tokens_per_turn=16", "rollout.episode.reward_metric=even_token_share",
    "rollout.guided_first_turn_regex='[abc]+'", "learner.lr=5e-3", "data.synthetic_entities=32",
    "train.export_hf=false", "logger.wandb.mode=disabled",
]
# The rises measured at 8 steps, lr 5e-3: 0.25 and 0.21 (GRPO, two runs) and 0.30 (REINFORCE++). At 1e-2 GRPO's
# reward fell back mid-run (0.86 -> 0.35 at step 5) and two runs rose 0.14 and 0.02: the sampling is not bitwise
# repeatable across runs, so the rate must leave a margin.
PROBE_MIN_RISE = 0.1


def _spans(mask: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, value) runs of equal mask values."""
    spans, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            spans.append((start, i, mask[start]))
            start = i
    return spans


@pytest.mark.slow
def test_information_tokens_are_masked_on_real_trajectories(ray_local, tiny_llama_path, tokenizer, synthetic_world):
    from actors.episode import EpisodeConfig
    from actors.rollout import EpisodeRequest, RolloutActor, RolloutConfig
    from simulator.engines import BM25Search

    cfg = RolloutConfig(guided_first_turn_regex=GUIDED_SEARCH,
                        episode=EpisodeConfig(max_turns=2, max_tokens_per_turn=24, max_obs_tokens=96))
    engine_kwargs = dict(enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=1024, dtype="bfloat16")
    actor = ray_local.remote(RolloutActor).options(num_cpus=1).remote(
        str(tiny_llama_path), engine_kwargs, functools.partial(BM25Search, str(synthetic_world["corpus"])), cfg)
    requests = [EpisodeRequest(f"g{i}", "Which company does Tavo Merin work for?", ("Rerza Foundry",), "t", i)
                for i in range(3)]
    stream = actor.rollout.options(num_returns="streaming").remote(requests, 2, 0.0)
    trajectories = [t for ref in stream for t in ray_local.get(ref, timeout=600)]
    assert len(trajectories) == 6 and len({t.group_id for t in trajectories}) == 3

    for t in trajectories:
        assert t.stats.searches >= 1  # the guided first turn
        for start, end, value in _spans(t.loss_mask):
            text = tokenizer.decode(t.response_ids[start:end])
            if value == 0:  # every masked span is exactly one observation or the invalid-action message
                assert (text.startswith("\n\n<information>") and text.endswith("</information>\n\n")) \
                    or text == INVALID_ACTION_MESSAGE, repr(text)
                assert all(lp == 0.0 for lp in t.rollout_logprobs[start:end])
            else:  # sampled tokens carry the engine's logprobs and no observation text
                assert "<information>" not in text
                assert all(lp < 0.0 or math.isclose(lp, 0.0, abs_tol=1e-6) for lp in t.rollout_logprobs[start:end])
        first_masked = t.loss_mask.index(0)
        assert tokenizer.decode(t.response_ids[:first_masked]).startswith("<search>")

    # The yardstick of bench/rollout_vs_raw.py: exactly the tokens asked for, one count for all or one per prompt.
    prompts = [trajectories[0].prompt_ids, trajectories[1].prompt_ids]
    assert ray_local.get(actor.raw_generate.remote(prompts, 4), timeout=600)["tokens"] == 8
    assert ray_local.get(actor.raw_generate.remote(prompts, [3, 6]), timeout=600)["tokens"] == 9


def _train(tmp_path, *overrides: str, timeout: int = 1200,
           env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """``python -m launch.train`` in a fresh process with a world and run folder under ``tmp_path``; its rows."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch.train", *overrides, f"data.dir={tmp_path / 'world'}",
           f"hydra.run.dir={run_dir}"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result, [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# Secrets planted in the run's environment: none may reach a file the run writes or its output (tests/test_security.py
# holds the static half of the check).
PLANTED_SECRETS = {"SERPAPI_API_KEY": "planted-serpapi-4f1c9e", "WANDB_API_KEY": "planted-wandb-" + "7" * 26,
                   "ZEROSEARCH_TEST_TOKEN": "planted-token-b2d8a0", "HF_TOKEN": "hf_plantedtoken93kd"}


@pytest.mark.slow
def test_training_steps_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    # Replay keeping every group's best episode (tiny-llama earns no reward to call a success): step 2 replays one.
    replay = ["replay.prompts=1", "replay.min_reward=0.0", "replay.max_group_mean=1.0", "replay.grounded=false"]
    result, rows = _train(tmp_path, *TINY_RUN, *TINY_WARMUP, *replay, "train.val_every=2", "train.val_samples=4",
                          env=PLANTED_SECRETS)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    for name, secret in PLANTED_SECRETS.items():
        assert secret not in result.stdout + result.stderr, name
        leaks = [str(p) for p in written if secret.encode() in p.read_bytes()]
        assert not leaks, f"{name} was written to {leaks}"
    assert [r["step"] for r in rows] == [1, 2]
    # Validation at step 2 only, against the simulator and against real BM25, side by side.
    assert not any(k.startswith("val/") for k in rows[0])
    for engine in ("simulated", "bm25"):
        assert rows[1][f"val/{engine}/searches"] >= 1.0  # the guided first turn searches
        assert 0.0 <= rows[1][f"val/{engine}/subem"] <= 100.0 and rows[1][f"val/{engine}/tokens"] > 0
    assert rows[1]["val/gap_subem"] == rows[1]["val/simulated/subem"] - rows[1]["val/bm25/subem"]
    for row in rows:
        assert all(math.isfinite(row[k]) for k in ("actor/pg_loss", "actor/kl", "actor/entropy", "actor/grad_norm"))
        assert row["search/calls_per_episode"] >= 1.0
        assert row["simulator/calls"] >= 1.0 and row["simulator/failures"] == 0.0  # searches went to the pool
        assert row["sync/canary_moved"] > 0.0  # the engine now runs the updated weights...
        assert row["sync/canary_gap"] < 0.01  # ...and they agree with the learner's
    # The exp curriculum over the run's 2 steps (m = train.total_steps): p_end 0.5 at the last step.
    assert [r["search/noise_prob"] for r in rows] == pytest.approx([0.5 * (4**0.5 - 1) / 3, 0.5])
    assert rows[1]["actor/kl"] > 0.0  # the policy moved away from the reference after the first update

    # Replay on the real stack: step 1 kept both groups' best, step 2 rolled one of those questions again beside one
    # fresh draw, and trained on its groups with the kept episode in (2 x 2 rolled, 1 replayed).
    assert rows[0]["replay/added"] == 2.0 and rows[0]["replay/groups"] == 0.0
    assert rows[1]["replay/groups"] == 1.0 and rows[1]["data/groups_rolled"] == 2.0
    batches = [json.loads(line) for line in (run_dir / "batches.jsonl").read_text().splitlines()]
    assert batches[1]["prompts"][0] in batches[0]["prompts"] and batches[1]["prompts"][1] not in batches[0]["prompts"]

    checkpoint = run_dir / "checkpoints" / "step_2"
    state = json.loads((checkpoint / "driver_state.json").read_text())
    assert state["step"] == 2 and state["sampler"]["position"] == 3  # 2 + 1: step 2 drew one fresh question
    kept = state["replay"]["entries"]  # the buffer resumes with the run
    assert kept and all(e["trajectory"]["prompt_ids"] and e["uses"] >= 0 for e in kept)
    assert (run_dir / "curves.png").stat().st_size > 0
    # Start-up is accounted for, stage by stage: the warm-up and the actors' start, in the order they ran.
    startup = json.loads((run_dir / "summary.json").read_text())["startup_s"]
    stages = ["ray", "warmup", "imports", "learners", "rollout_engines", "simulator_pool", "weight_sync"]
    assert list(startup) == [*stages, "total"] and startup["warmup"] > 0.0
    assert sum(startup[s] for s in stages) == pytest.approx(startup["total"], abs=0.5)
    assert list((run_dir / "wandb").glob("offline-run-*"))
    from transformers import AutoModelForCausalLM

    # The export loads in transformers. That vLLM serves what ``export_hf`` writes is checked on the tuned simulator
    # (tests/test_simulation_pipeline.py), the same learner code.
    assert AutoModelForCausalLM.from_pretrained(checkpoint / "hf").config.num_hidden_layers == 2

    # RL started from the warmed-up policy, which the run folder holds (warmup.cache=false).
    warmup = json.loads((run_dir / "warmup.json").read_text())
    assert warmup["demonstrations"] == 8 and warmup["sft_loss_last"] < warmup["sft_loss_first"]
    assert (run_dir / "warmed_policy" / "config.json").is_file()
    assert f"policy_start: {run_dir / 'warmed_policy'}" in result.stdout


@pytest.mark.slow
def test_a_hydra_sweep_trains_grpo_and_reinforce_pp_and_each_raises_a_learnable_reward(tmp_path):
    """``launch.train -m``, a Hydra multirun sweep: one job per estimator, one after the other in one process, each
    in its own folder with its own config, and each learns the probe reward."""
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "launch.train", "-m", *PROBE_RUN, "train.algorithm=grpo,reinforce_pp",
           f"data.dir={tmp_path / 'world'}", f"hydra.sweep.dir={sweep_dir}"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for job, algorithm in ((0, "grpo"), (1, "reinforce_pp")):
        job_dir = sweep_dir / str(job)
        assert yaml.safe_load((job_dir / ".hydra" / "config.yaml").read_text())["train"]["algorithm"] == algorithm
        rows = [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]
        rewards = [r["critic/score/mean"] for r in rows]
        assert len(rewards) == PROBE_STEPS, algorithm
        first, last = sum(rewards[:3]) / 3, sum(rewards[-4:]) / 4
        assert last > first + PROBE_MIN_RISE, (algorithm, rewards)
        assert all(r["sync/canary_gap"] < 0.01 for r in rows)  # the engine sampled from the weights that were trained
        assert json.loads((job_dir / "summary.json").read_text())["steps"] == PROBE_STEPS


def test_misspelled_override_fails_before_any_actor_starts():
    cmd = [sys.executable, "-m", "launch.train", "model=tiny_llama", "train.totl_steps=3"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "totl_steps" in result.stderr and "TrainConfig" in result.stderr
    assert "run folder" not in result.stdout  # nothing started
