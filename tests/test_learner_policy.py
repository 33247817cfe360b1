"""The policy learner on real DeepSpeed (CPU, gloo) with tiny-llama.

torch.distributed state is global to a process, so each DeepSpeed scenario runs in a fresh subprocess
(``python -m tests.test_learner_policy <scenario>``) or in Ray actors, and reports a JSON line back. One scenario
checks several things, to keep the number of slow DeepSpeed start-ups small.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SCENARIO_TIMEOUT_S = 600


def run_scenario(module: str, name: str, tmp_path: Path) -> dict:
    """Run ``name`` from ``module`` in a fresh interpreter; return the dict it printed after ``RESULT``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-m", module, name, str(tmp_path)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=SCENARIO_TIMEOUT_S, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    [line] = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


def make_samples(seed: int = 0, n: int = 5, trailing_obs: bool = True) -> list:
    """Samples of different lengths with an observation gap (mask 0) in the middle and, optionally, at the end."""
    from learners.batch import LearnerSample

    rng = random.Random(seed)
    samples = []
    for i in range(n):
        prompt, response = 3 + (i * 2) % 5, 6 + (i * 5) % 9
        ids = [rng.randrange(100, 5000) for _ in range(prompt + response)]
        mask = [1] * response
        mask[2:4] = [0, 0]
        if trailing_obs:
            mask[-1] = 0
        adv = rng.choice([-1.0, 0.5, 1.0])
        samples.append(LearnerSample(ids, prompt, mask, advantages=[adv] * response))
    return samples


# ----------------------------------------------------------------------------------------------------------------------
# Scenarios (run in a subprocess)
# ----------------------------------------------------------------------------------------------------------------------


def _params(trainer) -> dict:
    return {n: p.detach().float().clone() for n, p in trainer.engine.module.named_parameters()}


def scenario_core(out_dir: str) -> dict:
    """bf16 ZeRO-2: reference == policy, a step, the KL sign, publish, export, checkpoint round trip."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from launch.assets import model_path
    from learners.config import LearnerConfig
    from learners.policy import PolicyCore
    from learners.reference import ReferenceCore

    path = model_path("tiny-llama")
    out = Path(out_dir)
    trainer = PolicyCore(path, LearnerConfig(lr=1e-2, warmup_steps=0, micro_batch_tokens=48, kl_coef=0.001))
    reference = ReferenceCore(path, bf16=True)
    samples = make_samples()
    ref = reference.logprobs(samples)
    pol = trainer.logprobs(samples)
    result: dict = {"ref_vs_policy_max_abs": max(abs(a - b) for x, y in zip(ref, pol) for a, b in zip(x, y)),
                    "logprob_lens_ok": all(len(x) == s.response_len for x, s in zip(ref, samples))}
    for s, r in zip(samples, ref):
        s.ref_logprobs = r

    before = _params(trainer)
    metrics = trainer.train_step(samples)
    after = _params(trainer)
    result["metrics"] = metrics
    result["changed"] = sum(not torch.equal(before[n], after[n]) for n in before)
    result["total"] = len(before)

    # KL sign: a fresh optimizer (no momentum from the step above), advantages 0, entropy off, a large KL weight and a
    # reference that disagrees with the policy. Each step must bring the policy closer to that reference.
    kl_trainer = PolicyCore(path, LearnerConfig(lr=1e-3, warmup_steps=0, kl_coef=1.0, entropy_coef=0.0))
    shifted = [s.__class__(**{**s.__dict__, "advantages": [0.0] * s.response_len,
                              "ref_logprobs": [x - 1.0 for x in r]}) for s, r in zip(samples, ref)]
    result["kl_trace"] = [kl_trainer.train_step(shifted)["actor/kl"] for _ in range(4)]
    del kl_trainer

    # Published weights: every parameter, HF names, same values.
    published = trainer.publish_weights(out / "weights", version=3)
    tensors = load_file(published)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    now = _params(trainer)
    result["published_name"] = Path(published).name
    result["published_keys_match"] = set(tensors) == {n for n, _ in hf.named_parameters()}
    result["published_values_match"] = all(torch.equal(tensors[n].float(), now[n]) for n in now)
    result["no_tmp_left"] = sorted(p.name for p in (out / "weights").iterdir())

    # HF export loads in transformers and carries the trained weights.
    exported = AutoModelForCausalLM.from_pretrained(trainer.export_hf(out / "hf"), dtype=torch.float32)
    result["export_matches"] = all(torch.equal(p.float(), now[n]) for n, p in exported.named_parameters())

    # Checkpoint round trip: save, step (A), load, same step (B): A == B.
    trainer.save_checkpoint(out / "ckpt")
    step_before = trainer.global_step
    metrics_a = trainer.train_step(samples)
    weights_a = _params(trainer)
    trainer.train_step(samples)  # move further away, so the load has something to undo
    trainer.load_checkpoint(out / "ckpt")
    result["step_restored"] = trainer.global_step == step_before
    metrics_b = trainer.train_step(samples)
    weights_b = _params(trainer)
    result["resume_weights_equal"] = all(torch.equal(weights_a[n], weights_b[n]) for n in weights_a)
    result["resume_metrics_equal"] = metrics_a == metrics_b
    result["ckpt_dirs"] = sorted(p.name for p in out.iterdir())
    return result


def _exact_config(**overrides):
    """fp32 and an AdamW whose huge ε makes the first update linear in the gradient: Δθ ≈ −lr · g / ε.

    Then comparing updates compares gradients, including their scale (plain Adam's first step is ≈ −lr · sign(g)).
    """
    from learners.config import LearnerConfig

    base = dict(bf16=False, zero_stage=2, lr=100.0, adam_eps=1e4, weight_decay=0.0, grad_clip=0.0, warmup_steps=0,
                kl_coef=0.1, entropy_coef=0.01)
    return LearnerConfig(**{**base, **overrides})


def _update(trainer, samples) -> tuple[dict, dict]:
    before = _params(trainer)
    metrics = trainer.train_step(samples)
    return {n: p - before[n] for n, p in _params(trainer).items()}, metrics


def grouped_samples(seed: int = 4) -> list:
    """Two GRPO-like groups of 4 (one prompt each, responses of different lengths with an observation gap) and one
    sample whose prompt no other has."""
    from learners.batch import LearnerSample

    rng = random.Random(seed)
    samples = []
    for g, size in enumerate((4, 4, 1)):
        prompt = [rng.randrange(100, 5000) for _ in range(5 + 3 * g)]
        for k in range(size):
            response = 4 + (k * 3 + g) % 7
            mask = [1] * response
            mask[1] = 0
            samples.append(LearnerSample(prompt + [rng.randrange(100, 5000) for _ in range(response)], len(prompt),
                                         mask, advantages=[rng.choice([-1.0, 0.5, 1.0])] * response))
    return samples


def _max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def _rel_diff(a: dict, b: dict) -> float:
    import torch

    num = sum(torch.sum((a[n] - b[n]).double() ** 2) for n in a) ** 0.5
    den = sum(torch.sum(a[n].double() ** 2) for n in a) ** 0.5
    return float(num / den)


def scenario_exact(out_dir: str) -> dict:
    """fp32: one micro-batch vs many give the same update; tokens under loss_mask 0 contribute nothing."""
    import copy

    from launch.assets import model_path
    from learners.forward import plan_micro_batches
    from learners.policy import PolicyCore
    from learners.reference import ReferenceCore

    path = model_path("tiny-llama")
    samples = make_samples(seed=1, n=6)
    one = PolicyCore(path, _exact_config(micro_batch_tokens=10_000))
    ref = one.logprobs(samples)
    rng = random.Random(7)
    for i, (s, r) in enumerate(zip(samples, ref)):
        s.ref_logprobs = [x + rng.uniform(-0.5, 0.5) for x in r]
        if i % 2 == 0:  # half of the samples carry old logprobs (ratio != 1, some clipped), half are on-policy
            s.old_logprobs = [x + rng.uniform(-0.4, 0.4) for x in r]
    delta_one, metrics_one = _update(one, samples)

    many = PolicyCore(path, _exact_config(micro_batch_tokens=24))
    delta_many, metrics_many = _update(many, samples)

    # Perturb everything under loss_mask 0: advantages, old/ref logprobs, and the trailing observation token.
    perturbed = copy.deepcopy(samples)
    for s in perturbed:
        for t, m in enumerate(s.loss_mask):
            if m == 0:
                s.advantages[t] = 100.0
                if s.old_logprobs:
                    s.old_logprobs[t] = -30.0
                s.ref_logprobs[t] = -30.0
        s.input_ids[-1] = (s.input_ids[-1] + 17) % 5000 + 100  # last response token is an observation (mask 0)
    masked = PolicyCore(path, _exact_config(micro_batch_tokens=10_000))
    delta_masked, _ = _update(masked, perturbed)
    # Clipping to a quarter of the norm: the update shrinks to a quarter, and the metric is the norm before clipping.
    clipped = PolicyCore(path, _exact_config(micro_batch_tokens=10_000, grad_clip=metrics_one["actor/grad_norm"] / 4))
    delta_clipped, metrics_clipped = _update(clipped, samples)
    del one, many, masked, clipped

    # Mini-batches: 8 on-policy samples in mini-batches of 4 are 2 optimizer steps of one update at one rate. With no
    # old logprobs the ratio is 1, so with the KL and entropy off each step's token-mean loss is −Σ m·A / Σ m over
    # its own mini-batch, whatever the weights after the first step.
    eight = make_samples(seed=3, n=8)
    mini = PolicyCore(path, _exact_config(mini_batch_size=4, kl_coef=0.0, entropy_coef=0.0, warmup_steps=4))
    metrics_mini = mini.train_step(eight)
    hand = [-sum(sum(s.loss_mask) * s.advantages[0] for s in part) / sum(sum(s.loss_mask) for s in part)
            for part in (eight[:4], eight[4:])]
    first_update = [dict(entry) for entry in mini.step_log]
    mini.train_step(eight)

    # Shared prompts: two groups of 4 and a single sample; computing each group's prompt once gives the unshared
    # logprobs, loss and update (the KL and entropy terms included).
    groups = grouped_samples()
    reference = ReferenceCore(path, bf16=False, share_prompts=False).logprobs(groups)
    reference_shared = ReferenceCore(path, bf16=False, share_prompts=True).logprobs(groups)
    for sample, row in zip(groups, reference):
        sample.ref_logprobs = [x + 0.1 for x in row]
    shared_runs = {}
    for share in (False, True):
        trainer = PolicyCore(path, _exact_config(micro_batch_tokens=60, share_prompts=share))
        logprobs = trainer.logprobs(groups)
        shared_runs[share] = (logprobs, *_update(trainer, groups))
        del trainer
    (lp_plain, delta_plain, m_plain), (lp_shared, delta_shared, m_shared) = shared_runs[False], shared_runs[True]
    plan = plan_micro_batches(groups, 60, share_prompts=True)

    return {
        "micro_batches": [metrics_one["actor/micro_batches"], metrics_many["actor/micro_batches"]],
        "rel_diff_split": _rel_diff(delta_one, delta_many),
        "rel_diff_masked": _rel_diff(delta_one, delta_masked),
        "grad_norms": [metrics_one["actor/grad_norm"], metrics_many["actor/grad_norm"]],
        "pg_losses": [metrics_one["actor/pg_loss"], metrics_many["actor/pg_loss"]],
        "clip_fracs": [metrics_one["actor/clip_frac"], metrics_many["actor/clip_frac"]],
        "update_norm": sum(float(d.double().norm() ** 2) for d in delta_one.values()) ** 0.5,
        "clipped_update_norm": sum(float(d.double().norm() ** 2) for d in delta_clipped.values()) ** 0.5,
        "clipped_grad_norm": metrics_clipped["actor/grad_norm"],
        "mini_losses": [entry["loss"] for entry in first_update],
        "mini_hand": hand,
        "mini_lrs": [entry["lr"] for entry in first_update] + [entry["lr"] for entry in mini.step_log],
        "mini_steps": [metrics_mini["actor/optimizer_steps"], mini.global_step, mini.updates],
        "mini_ratio": [metrics_mini["actor/ratio_mean"], metrics_mini["actor/clip_frac"]],
        "shared_ref_gap": _max_gap(reference, reference_shared),
        "shared_logprob_gap": _max_gap(lp_plain, lp_shared),
        "shared_rel_diff": _rel_diff(delta_plain, delta_shared),
        "shared_metrics": [[m[k] for k in ("actor/pg_loss", "actor/grad_norm", "actor/kl", "actor/entropy")]
                           for m in (m_plain, m_shared)],
        "shared_plan": [len(b) for b, shared in zip(plan.batches, plan.shared) if shared],
    }


def scenario_zero3(out_dir: str) -> dict:
    """ZeRO-3 (weights sharded) with gradient checkpointing: the gathered weights are whole and load in transformers."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from launch.assets import model_path
    from learners.config import LearnerConfig
    from learners.policy import PolicyCore
    from learners.reference import ReferenceCore

    path = model_path("tiny-llama")
    cfg = LearnerConfig(zero_stage=3, gradient_checkpointing=True, lr=1e-2, warmup_steps=0, micro_batch_tokens=24,
                        kl_coef=0.0)
    trainer = PolicyCore(path, cfg)
    samples = make_samples()
    ref = ReferenceCore(path).logprobs(samples)
    pol = trainer.logprobs(samples)
    before = load_file(trainer.publish_weights(Path(out_dir) / "w", 0))
    metrics = trainer.train_step(samples)
    after = load_file(trainer.publish_weights(Path(out_dir) / "w", 1))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    exported = AutoModelForCausalLM.from_pretrained(trainer.export_hf(Path(out_dir) / "hf"), dtype=torch.float32)
    return {
        "ref_vs_policy_max_abs": max(abs(a - b) for x, y in zip(ref, pol) for a, b in zip(x, y)),
        "shapes_match": {n: list(p.shape) for n, p in hf.named_parameters()} == {
            n: list(t.shape) for n, t in after.items()},
        "changed": sum(not torch.equal(before[n], after[n]) for n in before),
        "total": len(before),
        "export_matches": all(torch.equal(p.float(), after[n].float()) for n, p in exported.named_parameters()),
        "finite": all(v == v for v in metrics.values()),
    }


SCENARIOS = {"core": scenario_core, "exact": scenario_exact, "zero3": scenario_zero3}


# ----------------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------------


def test_learner_config_defaults_and_yaml_presets():
    from omegaconf import OmegaConf

    from learners.config import LearnerConfig
    from learners.engine import deepspeed_config, warmup_factor, zero_stage

    cfg = LearnerConfig()
    assert cfg.resolved_warmup_steps() == 192  # int(0.95 * 203), the paper's actor warmup
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["optimizer"]["params"]["lr"] == 1e-6 and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and "data_types" not in ds
    # One rank has nothing to shard: fp32 runs without ZeRO (the core clips), bf16 as DeepSpeed's BF16_Optimizer.
    fp32 = deepspeed_config(LearnerConfig(bf16=False), world_size=1)
    assert fp32["zero_optimization"]["stage"] == 0 and fp32["gradient_clipping"] == 0.0
    bf16 = deepspeed_config(cfg, world_size=1)
    assert bf16["zero_optimization"]["stage"] == 1 and bf16["data_types"] == {"grad_accum_dtype": "fp32"}
    assert bf16["gradient_clipping"] == 1.0
    offload = LearnerConfig(bf16=False, extra_deepspeed={"zero_optimization": {"stage": 2, "offload_optimizer": {}}})
    assert zero_stage(offload, world_size=1) == 2 and deepspeed_config(offload, 1)["gradient_clipping"] == 1.0
    # A ZeRO section of the user's own is taken as written, so the clipping follows the stage that runs.
    own = LearnerConfig(bf16=False, extra_deepspeed={"zero_optimization": {"stage": 2}})
    assert zero_stage(own, world_size=1) == 2 and deepspeed_config(own, 1)["gradient_clipping"] == 1.0
    assert "data_types" not in deepspeed_config(LearnerConfig(zero_stage=1), world_size=2)
    assert deepspeed_config(LearnerConfig(zero_stage=3), world_size=1)["zero_optimization"]["stage"] == 3
    conf_dir = REPO_ROOT / "conf" / "learner"
    schema = OmegaConf.structured(LearnerConfig)
    default = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(conf_dir / "default.yaml")))
    assert default == cfg
    tiny = OmegaConf.load(conf_dir / "tiny.yaml")
    tiny.pop("defaults")
    tiny_cfg = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(conf_dir / "default.yaml"), tiny))
    assert tiny_cfg.lr == 1e-3 and tiny_cfg.resolved_warmup_steps() == 0
    with pytest.raises(ValueError, match="kl_coef"):
        LearnerConfig(kl_coef=-0.001).validate()


@pytest.fixture(scope="module")
def core_result(tmp_path_factory, tiny_llama_path) -> dict:
    return run_scenario("tests.test_learner_policy", "core", tmp_path_factory.mktemp("policy_core"))


@pytest.mark.slow
def test_reference_equals_policy_before_any_update(core_result):
    assert core_result["logprob_lens_ok"]
    assert core_result["ref_vs_policy_max_abs"] < 1e-6


@pytest.mark.slow
def test_train_step_changes_parameters_with_finite_metrics(core_result):
    metrics = core_result["metrics"]
    expected = {"actor/pg_loss", "actor/kl", "actor/entropy", "actor/clip_frac", "actor/grad_norm", "actor/lr",
                "actor/padding_share", "actor/num_tokens"}
    assert expected <= set(metrics)
    assert all(v == v and abs(v) < 1e6 for v in metrics.values())  # finite
    assert metrics["actor/num_tokens"] == sum(sum(s.loss_mask) for s in make_samples())
    assert metrics["actor/lr"] == pytest.approx(1e-2)
    assert metrics["actor/micro_batches"] > 1 and 0 < metrics["actor/padding_share"] < 1
    assert core_result["changed"] == core_result["total"]


@pytest.mark.slow
def test_kl_loss_pulls_the_policy_back_to_the_reference(core_result):
    trace = core_result["kl_trace"]
    assert trace[0] > 0
    assert all(b < a for a, b in zip(trace, trace[1:])), trace


@pytest.mark.slow
def test_published_weights_and_hf_export(core_result):
    assert core_result["published_name"] == "policy-v00000003.safetensors"
    assert core_result["published_keys_match"] and core_result["published_values_match"]
    assert core_result["no_tmp_left"] == ["policy-v00000003.safetensors"]
    assert core_result["export_matches"]


@pytest.mark.slow
def test_checkpoint_round_trip_continues_identically(core_result):
    assert core_result["step_restored"]
    assert core_result["resume_weights_equal"] and core_result["resume_metrics_equal"]
    assert core_result["ckpt_dirs"] == ["ckpt", "hf", "weights"]


@pytest.mark.slow
def test_gradient_accumulation_is_exact_and_mask_zero_tokens_do_not_count(tmp_path, tiny_llama_path):
    result = run_scenario("tests.test_learner_policy", "exact", tmp_path)
    one, many = result["micro_batches"]
    assert one == 1 and many >= 3
    # In the linear regime of the huge-ε AdamW the update is lr/ε times the gradient the optimizer was given.
    assert result["update_norm"] == pytest.approx(result["grad_norms"][0] * 100.0 / 1e4, rel=1e-2)
    assert result["clipped_update_norm"] == pytest.approx(result["update_norm"] / 4, rel=1e-2)
    assert result["clipped_grad_norm"] == pytest.approx(result["grad_norms"][0], rel=1e-5)
    assert result["rel_diff_split"] < 1e-4, result
    assert result["grad_norms"][0] == pytest.approx(result["grad_norms"][1], rel=1e-5)
    assert result["pg_losses"][0] == pytest.approx(result["pg_losses"][1], rel=1e-5)
    assert result["clip_fracs"][0] == pytest.approx(result["clip_fracs"][1]) and result["clip_fracs"][0] > 0
    assert result["rel_diff_masked"] < 1e-4, result
    # Mini-batches of 4 in a batch of 8: two optimizer steps, each the token mean of its own mini-batch, one rate
    # per update (warm-up over updates: 1/4 of the rate, then 2/4), ratio 1 without old logprobs.
    assert result["mini_steps"] == [2.0, 4, 2]
    assert result["mini_losses"] == pytest.approx(result["mini_hand"], rel=1e-6)
    assert result["mini_hand"][0] != pytest.approx(result["mini_hand"][1])
    assert result["mini_lrs"] == pytest.approx([25.0, 25.0, 50.0, 50.0])
    assert result["mini_ratio"] == pytest.approx([1.0, 0.0])
    # Shared prompts compute what the unshared forward computes: logprobs (reference and policy), loss, gradient.
    assert result["shared_plan"] and all(n > 1 for n in result["shared_plan"])  # some micro-batch did share
    assert result["shared_ref_gap"] < 1e-5 and result["shared_logprob_gap"] < 1e-5, result
    assert result["shared_rel_diff"] < 1e-4, result
    plain, shared = result["shared_metrics"]
    assert shared == pytest.approx(plain, rel=1e-5)


@pytest.mark.slow
def test_zero3_with_gradient_checkpointing_gathers_whole_weights(tmp_path, tiny_llama_path):
    result = run_scenario("tests.test_learner_policy", "zero3", tmp_path)
    assert result["ref_vs_policy_max_abs"] < 1e-6
    assert result["shapes_match"] and result["export_matches"] and result["finite"]
    assert result["changed"] == result["total"]


@pytest.mark.slow
def test_policy_learner_ray_actor_and_data_parallel_match(ray_local, tiny_llama_path, tmp_path):
    """One learner actor runs a step; two data-parallel actors on the same batch make the same update.

    With a 24-token budget the two ranks get 3 and 2 micro-batches: the lighter rank runs a zero-loss micro-batch so
    the ZeRO-2 reductions line up, and the update still equals the single learner's (5 micro-batches).
    """
    from safetensors.torch import load_file

    from learners.group import LearnerGroup
    from learners.policy import PolicyActor

    samples = make_samples(seed=2, n=5)
    for s in samples:
        s.ref_logprobs = [-5.0] * s.response_len
    cfg = _exact_config(micro_batch_tokens=24)
    results, canary, checksums, resumed = {}, {}, {}, {}
    for n in (1, 2):
        group = LearnerGroup(PolicyActor, n, str(tiny_llama_path), cfg, num_cpus=1, timeout_s=600)
        try:
            logprobs = group.logprobs(samples)
            metrics = group.train_step(samples)
            path = group.publish_weights(str(tmp_path / f"dp{n}"), version=1)
            results[n] = (logprobs, metrics, load_file(path))
            # The weight-sync canary is one sample: fewer than the ranks, yet every rank takes part.
            canary[n] = group.logprobs(samples[:1])
            checksums[n] = group.published_checksum()
            # Checkpoint, step (A), restore, the same step (B): the group resumes exactly.
            group.save_checkpoint(str(tmp_path / f"ckpt{n}"))
            step_a = group.train_step(samples)
            group.load_checkpoint(str(tmp_path / f"ckpt{n}"))
            resumed[n] = (step_a, group.train_step(samples))
        finally:
            group.shutdown()
    (lp1, m1, w1), (lp2, m2, w2) = results[1], results[2]
    assert len(canary[2]) == 1 and canary[2][0] == pytest.approx(canary[1][0], abs=1e-5)
    assert checksums[1] == pytest.approx(checksums[2], rel=1e-6) and checksums[1] > 0
    for n in (1, 2):
        step_a, step_b = resumed[n]
        assert step_b["actor/pg_loss"] == step_a["actor/pg_loss"] and step_b["actor/lr"] == step_a["actor/lr"]
        assert step_b["actor/grad_norm"] == pytest.approx(step_a["actor/grad_norm"], rel=1e-9)
    assert [len(x) for x in lp1] == [s.response_len for s in samples]
    assert max(abs(a - b) for x, y in zip(lp1, lp2) for a, b in zip(x, y)) < 1e-5
    assert (m1["actor/micro_batches"], m2["actor/micro_batches"]) == (5, 3)  # rank 0 of 2 runs 3, rank 1 runs 2
    assert m1["actor/num_tokens"] == m2["actor/num_tokens"]
    assert m1["actor/pg_loss"] == pytest.approx(m2["actor/pg_loss"], rel=1e-5)
    assert m1["actor/grad_norm"] == pytest.approx(m2["actor/grad_norm"], rel=1e-4)
    delta = {n: w2[n].double() - w1[n].double() for n in w1}
    base = load_file(str(Path(tiny_llama_path) / "model.safetensors"))
    update = {n: w1[n].double() - base[n].double() for n in w1 if n in base}
    rel = sum(float(d.norm() ** 2) for d in delta.values()) ** 0.5 / sum(
        float(u.norm() ** 2) for u in update.values()) ** 0.5
    assert rel < 1e-3, rel


if __name__ == "__main__":
    print("RESULT " + json.dumps(SCENARIOS[sys.argv[1]](sys.argv[2])), flush=True)


def test_a_build_lock_left_by_a_killed_process_is_cleared_and_a_fresh_one_kept(tmp_path, monkeypatch):
    import os
    import time

    from learners.distributed import clear_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "cpu_adam" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    old = time.time() - 600
    os.utime(stale, (old, old))
    assert clear_stale_build_locks(max_age_s=120) == [str(stale)]
    assert not stale.exists() and fresh.exists()


def test_ops_build_inside_the_python_environment_unless_told_otherwise(tmp_path, monkeypatch):
    import os
    import sys

    from learners.distributed import use_environment_build_dir

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert use_environment_build_dir() == Path(sys.prefix) / "torch_extensions"
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # a user's choice wins
    assert use_environment_build_dir() == tmp_path


def test_ops_build_with_the_environments_own_ninja_whatever_the_path_finds_first(tmp_path, monkeypatch):
    """Two ninja versions hash a command line differently and rebuild each other's builds: the environment's wins."""
    import os
    import shutil
    import sys

    from learners.distributed import use_environment_build_dir

    own = Path(sys.executable).parent / "ninja"
    if not own.is_file():
        pytest.skip("this environment has no ninja of its own")
    other = tmp_path / "bin"
    other.mkdir()
    (other / "ninja").write_text("#!/bin/sh\n")
    (other / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(other), str(own.parent), "/usr/bin"]))
    assert shutil.which("ninja") == str(other / "ninja")
    use_environment_build_dir()
    assert shutil.which("ninja") == str(own)
    assert os.environ["PATH"].split(os.pathsep) == [str(own.parent), str(other), "/usr/bin"]
    use_environment_build_dir()  # idempotent
    assert os.environ["PATH"].split(os.pathsep) == [str(own.parent), str(other), "/usr/bin"]
