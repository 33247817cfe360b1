"""The training driver: ``python -m launch.train [group=option ...] [key=value ...]``.

    python -m launch.train --cfg job            # print the composed config and exit
    python -m launch.train model=tiny_llama     # the default job on the tiny test model

One RL step, as in the paper's algorithm box:
    1. sample B prompts; each is rolled out n times (a group)
    2. read the noise probability p from the curriculum
    3. roll out: vLLM policy engines run multi-turn search episodes against the (simulated) engine
       (1-3 run in the background, up to ``train.max_staleness`` steps ahead: ``launch/pipeline.py``)
    4. reference logprobs, critic values (PPO); advantages from the rewards (GRPO: group mean and std)
    5. one policy update on the learners (observation tokens masked); the critic's update (PPO)
    6. publish the new weights; the engines load them in place; a canary checks they agree with the learner
    7. advance the curriculum; log; checkpoint every k steps
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from launch.config import Config, register_configs

register_configs()


class CanaryError(RuntimeError):
    """The engines' logprobs disagree with the learner's after a weight sync."""


class WeightSyncError(RuntimeError):
    """An engine does not serve the version (or the weights) the learners just published."""


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(dict_cfg: DictConfig) -> None:
    from launch.resume import run_folder

    run_dir = run_folder(dict_cfg.resume, Path(dict_cfg.logger.run_dir))
    cfg: Config = OmegaConf.to_object(dict_cfg)  # typed dataclasses from here on
    train(cfg, run_dir, OmegaConf.to_container(dict_cfg, resolve=True))


def train(cfg: Config, run_dir: Path, config_dict: dict[str, Any]) -> dict[str, Any]:
    import ray

    from actors.dataset import load_qa
    from launch.assets import resolve_model
    from launch.paths import ensure_data
    from launch.pipeline import RolloutQueue
    from launch.resume import find_checkpoint
    from launch.run_logger import RunLogger
    from launch.sampler import PromptSampler
    from launch.warmup import warm_up
    from simulator.curriculum import build_curriculum

    _check(cfg)
    files = ensure_data(cfg.data)
    sampler = PromptSampler(load_qa(files["train"]), seed=cfg.seed, shuffle=cfg.data.shuffle)
    val_examples = load_qa(files["val"])[: cfg.train.val_samples] if cfg.train.val_every else []
    curriculum = build_curriculum(cfg.curriculum)
    policy_path = resolve_model(cfg.model.name)
    checkpoint = find_checkpoint(run_dir, cfg.resume)
    logger = RunLogger(run_dir, cfg.logger.wandb, cfg.logger.run_name, config_dict, resume=checkpoint is not None)
    print(f"run folder: {run_dir}", flush=True)

    init_ray(cfg)
    stop = _StopFlag()
    cluster = rollouts = None
    try:
        # Cold start of small policies: SFT on protocol demonstrations (train.warmup=auto|on|off).
        policy_path, warmup = warm_up(cfg, policy_path, files["train"], files["corpus"], run_dir)
        if warmup:
            _atomic_write_json(run_dir / "warmup.json", warmup)
        cluster = Cluster(cfg, policy_path, str(files["corpus"]), run_dir)
        first = 1
        if checkpoint is not None:
            first = cluster.restore(checkpoint, curriculum, sampler) + 1
            dropped = logger.truncate_after(first - 1)
            print(f"resumed from {checkpoint} (step {first - 1}; {dropped} later metrics rows dropped)", flush=True)
        rollouts = RolloutQueue(cluster.rollout, sampler, curriculum, cfg.train.prompts_per_step,
                                cfg.train.total_steps, cfg.train.max_staleness, cfg.train.rollout_timeout_s,
                                cfg.train.dynamic_filter, cfg.train.dynamic_filter_rounds)
        progress = _Progress(cfg.train.total_steps, first - 1)
        step = first - 1
        for step in range(first, cfg.train.total_steps + 1):
            t_step = time.perf_counter()
            rollouts.fill(step)                                                          # 1-3, K steps ahead
            batch, t_wait = rollouts.take(step)                                          # 1-3
            t_score = time.perf_counter()
            samples, score_metrics = cluster.score(batch.trajectories)                  # 4
            t_score = time.perf_counter() - t_score
            train_metrics, t_train = cluster.update(samples)                             # 5
            t_idle = rollouts.wait_idle()  # weights change only between rollouts
            sync_metrics = cluster.sync_weights(version=step)                            # 6
            metrics = _step_metrics(batch, {**score_metrics, **train_metrics}, sync_metrics, t_score, t_train,
                                    time.perf_counter() - t_step, t_wait, t_idle, cluster)
            if cfg.train.val_every and step % cfg.train.val_every == 0:  # the engines are idle since the sync
                metrics.update(cluster.validate(val_examples))
            curriculum.observe(metrics["critic/score/mean"])                            # 7
            logger.log(step, metrics, _sample_rows(batch.trajectories, cfg.logger.wandb.sample_table_rows),
                       {"prompts": batch.prompt_uids, "noise_prob": batch.noise_prob,
                        "policy_versions": sorted({t.policy_version for t in batch.trajectories})})
            progress.show(step, metrics)
            if stop.requested:
                break
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.total_steps:
                cluster.checkpoint(run_dir / "checkpoints", step, curriculum, batch.sampler_state, export_hf=False)
        progress.close()
        final = cluster.checkpoint(run_dir / "checkpoints", step, curriculum, batch.sampler_state,
                                   export_hf=cfg.train.export_hf) if step >= first else checkpoint
        if stop.requested:
            print(f"interrupted after step {step}: checkpoint written, exiting", flush=True)
        probe = {}
        if cfg.train.throughput_probe and not stop.requested and step >= first:
            probe = cluster.raw_throughput(batch.trajectories, metrics["perf/tokens_per_s"])
        plot = logger.plot()
        wandb_dir = logger.finish()
        summary = {"run_dir": str(run_dir), "metrics": str(logger.metrics_path), "plot": str(plot),
                   "checkpoint": str(final), "wandb": wandb_dir, "steps": step, "policy_start": policy_path,
                   **probe}
        _atomic_write_json(run_dir / "summary.json", summary)
        print("\n".join(f"{k}: {v}" for k, v in summary.items()), flush=True)
        return summary
    finally:
        if rollouts is not None:
            rollouts.close()
        if cluster is not None:
            cluster.close()
        ray.shutdown()


class Cluster:
    """The actors of one run, placed from ``cfg.cluster``: policy engines, simulator pool, learners, reference."""

    def __init__(self, cfg: Config, policy_path: str, corpus_path: str, run_dir: Path) -> None:
        import ray
        from transformers import AutoTokenizer

        from actors.rollout import RolloutActor
        from learners.group import LearnerGroup
        from learners.policy import PolicyLearner
        from learners.reference import ReferenceLearner
        from simulator.simulated import build_search_engine

        self.cfg = cfg
        self.closing = False
        c = cfg.cluster
        timeout = c.actor_start_timeout_s
        self.weights_dir = _weights_dir(run_dir)
        # The cluster group places the simulator servers; the simulator group says what they run.
        sim_cfg = dataclasses.replace(cfg.simulator, num_servers=c.simulator_servers, gpus_per_server=c.simulator_gpus,
                                      tensor_parallel_size=c.simulator_tensor_parallel)
        self.pool = None
        if cfg.search.engine == "simulated":
            from simulator.pool import create_simulator_pool

            self.pool = create_simulator_pool(sim_cfg)
        # A picklable recipe: each rollout actor builds its own engine in its own process.
        search_factory = functools.partial(build_search_engine, cfg.search, sim_cfg, self.pool, corpus_path)
        engine_kwargs, env = policy_engine_options(cfg)
        validation_factory = None
        if cfg.train.val_every and cfg.train.val_engine != cfg.search.engine:
            real = dataclasses.replace(cfg.search, engine=cfg.train.val_engine)
            validation_factory = functools.partial(build_search_engine, real, sim_cfg, None, corpus_path)
        # Fault injection for tests: this engine ignores every weight load (the sync check must name it).
        stuck = int(os.environ.get("ZEROSEARCH_FAULT_SKIP_WEIGHT_LOADS", "-1"))
        self.engines = [
            ray.remote(RolloutActor).options(num_cpus=1, num_gpus=c.rollout_gpus, max_concurrency=10_000)
            .remote(policy_path, engine_kwargs, search_factory, cfg.rollout, env, validation_factory,
                    skip_weight_loads=k == stuck)
            for k in range(c.rollout_engines)
        ]
        learner_cfg = cfg.learner  # its total_steps is ${train.total_steps} unless set on purpose
        # A KL penalty in the reward replaces the KL loss term; the coefficient is the same key either way.
        self.kl_in_reward = learner_cfg.kl_coef if kl_penalty(cfg) == "reward" else 0.0
        policy_cfg = dataclasses.replace(learner_cfg, kl_coef=0.0) if self.kl_in_reward else learner_cfg
        self.learners = LearnerGroup(PolicyLearner, c.learners, policy_path, policy_cfg, num_cpus=1,
                                     num_gpus=c.learner_gpus, timeout_s=timeout)
        self.critic = None
        if cfg.train.algorithm == "ppo":
            from learners.critic import Critic

            self.critic = LearnerGroup(Critic, c.critics, policy_path, cfg.critic, num_cpus=1,
                                       num_gpus=c.critic_gpus, timeout_s=timeout)
        self.reference = None
        if learner_cfg.kl_coef > 0:
            self.reference = ReferenceLearner.options(num_cpus=0.5, num_gpus=c.reference_gpus).remote(
                policy_path, bf16=learner_cfg.reference_bf16, offload=learner_cfg.offload_reference,
                micro_batch_tokens=learner_cfg.logprob_micro_batch_tokens, cpu_threads=learner_cfg.cpu_threads,
                share_prompts=learner_cfg.share_prompts)
        ray.get([e.ready.remote() for e in self.engines], timeout=timeout)
        tokenizer = AutoTokenizer.from_pretrained(policy_path)
        self.canary_ids = tokenizer.encode(cfg.train.canary_text, add_special_tokens=False)
        self.manifest = self._open_weight_group() if c.weight_sync != "file" else None

    def _open_weight_group(self) -> dict:
        """Learner rank 0 and every engine worker join one broadcast group; the engines check what they will get."""
        import ray

        from learners.weight_broadcast import group_layout

        c, timeout = self.cfg.cluster, self.cfg.train.sync_timeout_s
        offsets, world = group_layout([c.rollout_tensor_parallel] * len(self.engines))
        addr, port = self.learners.rendezvous_address()
        wire_dtype = None if self.cfg.model.dtype == "auto" else self.cfg.model.dtype  # what the engines serve
        refs = self.learners.open_weight_group(addr, port, world, c.weight_sync, timeout,
                                               c.weight_sync_bucket_mb * 2**20, wire_dtype)
        refs += [e.init_weight_group.remote(addr, port, offset, world, c.weight_sync, timeout)
                 for e, offset in zip(self.engines, offsets)]
        ray.get(refs, timeout=timeout + 60)
        manifest = self.learners.weight_manifest()
        ray.get([e.check_weights.remote(manifest, timeout) for e in self.engines], timeout=timeout + 30)
        return manifest

    def validate(self, examples) -> dict[str, float]:
        """Greedy answers to ``examples`` with the training engine (noise 0: the simulator's useful documents) and
        with the real validation engine; their metrics side by side, and the gap."""
        from actors.evaluation import EvalRecord, dataset_metrics

        passes = [(self.cfg.search.engine, False)]
        if self.cfg.train.val_engine != self.cfg.search.engine:
            passes.append((self.cfg.train.val_engine, True))
        metrics: dict[str, float] = {}
        for name, real in passes:
            trajectories = self.rollout(examples, 0.0, step=0, temperature=0.0, validation_engine=real)
            records = [EvalRecord.from_trajectory("val", "", t) for t in trajectories]
            for key, value in dataset_metrics(records).items():
                if key != "n":
                    metrics[f"val/{name}/{key}"] = value
        if len(passes) == 2:
            (sim, _), (real_name, _) = passes
            metrics["val/gap_subem"] = metrics[f"val/{sim}/subem"] - metrics[f"val/{real_name}/subem"]
        return metrics

    def rollout(self, prompts, noise_prob: float, step: int, first_index: int = 0, temperature: float | None = None,
                validation_engine: bool = False):
        """Run every group; groups stream back as they finish. Every wait is bounded by the rollout timeout.

        ``first_index`` numbers the prompts of a refill round after those of the step's earlier rounds, so that every
        episode of a step has its own seed."""
        import ray

        from launch.batching import episode_requests

        started = time.perf_counter()
        deadline = started + self.cfg.train.rollout_timeout_s
        requests = episode_requests(prompts, self.cfg.seed, step, first_index)
        group_size = 1 if temperature == 0.0 else self.cfg.train.group_size  # greedy: one answer per question
        streams = [engine.rollout.options(num_returns="streaming").remote(
                   requests[k::len(self.engines)], group_size, noise_prob, temperature, validation_engine)
                   for k, engine in enumerate(self.engines)]
        trajectories = []
        for stream in streams:
            while True:
                # Short waits, so that a background rollout notices the run closing instead of holding up the exit.
                ready, _ = ray.wait([stream], timeout=min(5.0, max(0.0, deadline - time.perf_counter())))
                if self.closing:
                    raise RuntimeError(f"rollout of step {step} abandoned: the run is closing")
                if not ready and time.perf_counter() < deadline:
                    continue
                if not ready:
                    raise TimeoutError(f"rollout of step {step} did not finish within "
                                       f"train.rollout_timeout_s={self.cfg.train.rollout_timeout_s}")
                try:
                    ref = next(stream)
                except StopIteration:
                    break
                trajectories.extend(ray.get(ref, timeout=60))
        return trajectories

    def score(self, trajectories) -> tuple[list, dict[str, float]]:
        """Learner samples with everything the update needs: reference logprobs, critic values, advantages."""
        import ray

        from launch.batching import assign_advantages, learner_samples

        t = self.cfg.train
        samples = learner_samples(trajectories)
        metrics: dict[str, float] = {}
        if self.reference is not None:
            ref = ray.get(self.reference.logprobs.remote(samples), timeout=self.cfg.cluster.actor_start_timeout_s)
            for sample, logprobs in zip(samples, ref):
                sample.ref_logprobs = logprobs
        source = old_logprobs_source(self.cfg, len(samples))
        if source == "learner":
            for sample, logprobs in zip(samples, self.learners.logprobs(samples)):
                sample.old_logprobs = logprobs
            metrics["rollout/engine_vs_learner_logprob_gap"] = _masked_gap(samples)
        elif source == "engine":
            for sample in samples:
                sample.old_logprobs = list(sample.rollout_logprobs)
        if self.critic is not None:
            for sample, values in zip(samples, self.critic.values(samples)):
                sample.old_values = values
        metrics.update(assign_advantages(samples, trajectories, t.algorithm, self.kl_in_reward, t.gamma, t.lam))
        return samples, metrics

    def update(self, samples) -> tuple[dict[str, float], float]:
        started = time.perf_counter()
        metrics = self.learners.train_step(samples)
        if self.critic is not None:
            metrics.update(self.critic.train_step(samples))
        return metrics, time.perf_counter() - started

    def sync_weights(self, version: int) -> dict[str, float]:
        """Publish, load in every engine, then compare engine and learner logprobs on fixed tokens."""
        import ray

        from learners.batch import LearnerSample

        timeout = self.cfg.train.sync_timeout_s
        before = ray.get(self.engines[0].prompt_logprobs.remote(self.canary_ids), timeout=timeout)
        started = time.perf_counter()
        if self.manifest is None:  # weight_sync=file
            path = self.learners.publish_weights(str(self.weights_dir), version)
            ray.get([e.load_weights.remote(path, version, timeout) for e in self.engines], timeout=timeout)
            _remove_older_weights(self.weights_dir, keep=path)
            published = self.learners.published_checksum()
        else:  # learners send while engines receive; neither side finishes alone
            bucket_bytes = self.cfg.cluster.weight_sync_bucket_mb * 2**20
            sends = self.learners.broadcast_weights(self.manifest)
            results = ray.get(sends + [e.receive_weights.remote(self.manifest, bucket_bytes, version, timeout)
                                       for e in self.engines], timeout=timeout)
            published = results[0]["checksum"]  # learner rank 0 sent it
        elapsed = time.perf_counter() - started
        self._check_loaded(version, published)
        canary = LearnerSample(input_ids=self.canary_ids, prompt_len=1, loss_mask=[1] * (len(self.canary_ids) - 1))
        [learner_lp] = self.learners.logprobs([canary])
        engine_lps = ray.get([e.prompt_logprobs.remote(self.canary_ids) for e in self.engines], timeout=timeout)
        gap = max(_mean_abs_gap(lp, learner_lp) for lp in engine_lps)
        if gap > self.cfg.train.canary_tolerance:
            raise CanaryError(f"after syncing version {version}, engine and learner logprobs differ by {gap:.4f} "
                              f"nats/token (train.canary_tolerance={self.cfg.train.canary_tolerance})")
        return {"timing_s/sync": elapsed, "sync/canary_gap": gap, "sync/canary_moved": _mean_abs_gap(before,
                                                                                                     engine_lps[0])}

    def _check_loaded(self, version: int, published: float) -> None:
        """Every engine reports serving ``version``, and the checksum of what it loaded equals the learner's.

        The canary alone cannot tell: at the paper's lr 1e-6 an update moves logprobs far less than its tolerance,
        so an engine left on the previous weights would pass it."""
        import ray

        states = ray.get([e.weights_state.remote() for e in self.engines], timeout=self.cfg.train.sync_timeout_s)
        for k, state in enumerate(states):
            same_sum = state["checksum"] is not None and math.isclose(state["checksum"], published, rel_tol=1e-9)
            if state["version"] != version or not same_sum:
                raise WeightSyncError(
                    f"rollout engine {k} of {len(self.engines)} serves policy version {state['version']} with weights "
                    f"checksum {state['checksum']}, but the learners published version {version} with checksum "
                    f"{published}: the engine did not load the new weights (cluster.weight_sync="
                    f"{self.cfg.cluster.weight_sync})")

    def raw_throughput(self, trajectories, rollout_tokens_per_s: float) -> dict[str, float]:
        """Plain vLLM ``generate`` at the last step's volume (its prompts, its mean tokens per episode), on the same
        engines, against the multi-turn rollout's tokens/s: what searching, observation prefill and turn-taking cost."""
        import ray

        prompts = [t.prompt_ids for t in trajectories]
        max_tokens = max(1, round(statistics.fmean(t.stats.generated_tokens for t in trajectories)))
        started = time.perf_counter()
        ray.get([e.raw_generate.remote(prompts[k::len(self.engines)], max_tokens)
                 for k, e in enumerate(self.engines)], timeout=self.cfg.train.rollout_timeout_s)
        raw = len(prompts) * max_tokens / (time.perf_counter() - started)
        return {"perf/raw_generate_tokens_per_s": raw, "perf/rollout_tokens_per_s": rollout_tokens_per_s,
                "perf/rollout_vs_raw": rollout_tokens_per_s / raw}

    def close(self) -> None:
        self.closing = True
        shutil.rmtree(self.weights_dir, ignore_errors=True)

    def checkpoint(self, root: Path, step: int, curriculum, sampler_state: dict, export_hf: bool) -> Path:
        """DeepSpeed states (policy, critic), the driver's state and (at the end) an HF export, under
        ``root/step_<k>``. ``driver_state.json`` goes last: its presence marks the checkpoint complete."""
        from launch.resume import DRIVER_STATE, rng_state

        folder = root / f"step_{step}"
        folder.mkdir(parents=True, exist_ok=True)
        self.learners.save_checkpoint(str(folder / "deepspeed"))
        if self.critic is not None:
            self.critic.save_checkpoint(str(folder / "critic"))
        if export_hf:
            self.learners.export_hf(str(folder / "hf"))
        state = {"step": step, "curriculum": curriculum.state_dict(), "sampler": sampler_state, "rng": rng_state()}
        _atomic_write_json(folder / DRIVER_STATE, state)
        return folder

    def restore(self, folder: Path, curriculum, sampler) -> int:
        """Load a checkpoint written by ``checkpoint`` and put its weights on the engines; return its step."""
        from launch.resume import read_driver_state, set_rng_state

        state = read_driver_state(folder)
        self.learners.load_checkpoint(str(folder / "deepspeed"))
        if self.critic is not None:
            self.critic.load_checkpoint(str(folder / "critic"))
        curriculum.load_state_dict(state["curriculum"])
        sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        self.sync_weights(version=state["step"])
        return int(state["step"])

    def pool_stats(self) -> dict[str, Any]:
        import ray

        if self.pool is None:
            return {}
        return ray.get(self.pool.stats.remote(), timeout=30)


def _step_metrics(batch, train_metrics, sync_metrics, t_score, t_train, t_step, t_wait, t_idle,
                  cluster: Cluster) -> dict[str, float]:
    from launch.batching import rollout_metrics

    trajectories = batch.trajectories
    metrics = rollout_metrics(trajectories)
    # The policy's score is over every group rolled; with dynamic filtering the groups trained on are a biased subset.
    metrics["critic/score/kept_mean"] = metrics["critic/score/mean"]
    metrics["critic/score/mean"] = batch.score_mean
    metrics.update({k: float(v) for k, v in train_metrics.items()})
    metrics.update(sync_metrics)
    generated = sum(t.stats.generated_tokens for t in trajectories)
    # The learners' weights before this step's update are version step − 1: that is the on-policy version.
    staleness = [batch.step - 1 - t.policy_version for t in trajectories]
    metrics.update({
        "search/noise_prob": batch.noise_prob,
        "async/staleness_mean": statistics.fmean(staleness),
        "async/staleness_max": float(max(staleness)),
        "async/policy_version_min": float(min(t.policy_version for t in trajectories)),
        "data/groups_rolled": float(batch.groups_rolled),
        "data/signal_share": batch.signal_share,
        "data/filter_pass_rate": batch.pass_rate,
        "data/rollout_rounds": float(batch.rounds),
        "timing_s/gen": batch.gen_s,
        "timing_s/wait_rollout": t_wait,
        "timing_s/wait_idle": t_idle,
        "timing_s/sim_per_episode": statistics.fmean(t.stats.search_s for t in trajectories),
        # Reference logprobs, recomputed old logprobs, critic values and advantages: the learners' passes before the
        # update.
        "timing_s/score": t_score,
        "timing_s/train": t_train,
        "timing_s/step": t_step,
        "timing_s/other": max(0.0, t_step - t_wait - t_score - t_train - t_idle - sync_metrics["timing_s/sync"]),
        "perf/tokens_per_s": generated / max(batch.gen_s, 1e-9),
        # 1.0 when rollout and training overlap perfectly (async); about 1 + faster/slower when they alternate.
        "perf/step_vs_slowest": t_step / max(batch.gen_s, t_train, 1e-9),
    })
    for key, value in cluster.pool_stats().items():
        if isinstance(value, (int, float)):
            metrics[f"simulator/{key}"] = float(value)
    return metrics


def _sample_rows(trajectories, n: int) -> list[dict[str, Any]]:
    return [{"group": t.group_id, "reward": t.reward, "searches": t.stats.searches, "finish": t.stats.finish_reason,
             "answers": " | ".join(t.golden_answers), "response": t.response_text[:2000]}
            for t in trajectories[:n]]


class _Progress:
    """A progress bar (step, reward, noise probability, searches) on a terminal, and one full line per step always,
    so that logs of batch jobs carry every step too. Warns once when no group has had a learning signal for
    ``SILENT_STEPS`` steps in a row."""

    SILENT_STEPS = 3

    def __init__(self, total: int, done: int = 0) -> None:
        from tqdm import tqdm

        self.total = total
        self.silent = 0
        self.bar = tqdm(total=total, initial=done, desc="RL steps", unit="step", dynamic_ncols=True,
                        disable=not sys.stderr.isatty())

    def show(self, step: int, m: dict[str, float]) -> None:
        self.bar.set_postfix(reward=f"{m['critic/score/mean']:.3f}", noise=f"{m['search/noise_prob']:.3f}",
                             searches=f"{m['search/calls_per_episode']:.2f}", signal=f"{m['data/signal_share']:.2f}")
        self.bar.update(1)
        self.bar.write(
            f"step {step}/{self.total}  reward {m['critic/score/mean']:.3f}  noise {m['search/noise_prob']:.3f}  "
            f"searches {m['search/calls_per_episode']:.2f}  signal {m['data/signal_share']:.2f}  "
            f"valid {m['episode/valid_action_share']:.2f}  entropy {m.get('actor/entropy', float('nan')):.3f}  "
            f"kl {m.get('actor/kl', 0.0):.4f}  step {m['timing_s/step']:.1f}s (gen {m['timing_s/gen']:.1f}s, "
            f"score {m['timing_s/score']:.1f}s, train {m['timing_s/train']:.1f}s, sync {m['timing_s/sync']:.2f}s)",
            file=sys.stdout)
        self.silent = self.silent + 1 if m["data/signal_share"] == 0.0 else 0
        if self.silent == self.SILENT_STEPS:
            self.bar.write(silent_warning(self.silent, m), file=sys.stdout)
        sys.stdout.flush()

    def close(self) -> None:
        self.bar.close()


def silent_warning(steps: int, m: dict[str, float]) -> str:
    """Why a run whose groups all had equal rewards cannot learn, and what to change."""
    entropy = m.get("actor/entropy", float("nan"))
    return (f"warning: for {steps} steps every group's rewards were equal (data/signal_share 0), so every advantage "
            f"is 0 and the updates carry only the KL and entropy terms: this run is not learning. The policy's "
            f"entropy is {entropy:.3f} nats/token; near 0, its samples of one question are all alike (a collapsed "
            f"cold start). Try a larger train.group_size, a higher rollout.temperature, train.dynamic_filter=true, "
            f"or a shorter warm-up (warmup.steps, warmup.lr).")


def _check(cfg: Config) -> None:
    from launch.batching import ALGORITHMS

    if cfg.train.algorithm not in ALGORITHMS:
        raise ValueError(f"train.algorithm={cfg.train.algorithm!r}; expected one of {list(ALGORITHMS)}")
    if cfg.cluster.weight_sync not in ("file", "nccl", "gloo"):
        raise ValueError(f"cluster.weight_sync={cfg.cluster.weight_sync!r}; expected file, nccl or gloo")
    if cfg.train.max_staleness < 0:
        raise ValueError(f"train.max_staleness={cfg.train.max_staleness}; expected 0 (on-policy) or more")
    if cfg.train.kl_penalty not in ("auto", "loss", "reward"):
        raise ValueError(f"train.kl_penalty={cfg.train.kl_penalty!r}; expected auto, loss or reward")
    from learners.algorithms import TOKEN_REWARD_ALGORITHMS

    if kl_penalty(cfg) == "reward" and cfg.train.algorithm not in TOKEN_REWARD_ALGORITHMS:
        raise ValueError(f"train.kl_penalty=reward needs per-token rewards: train.algorithm must be one of "
                         f"{list(TOKEN_REWARD_ALGORITHMS)}, got {cfg.train.algorithm!r}")
    if cfg.resume not in ("off", "auto") and not Path(cfg.resume).is_dir():
        raise ValueError(f"resume={cfg.resume!r}: expected off, auto, or an existing run folder")
    from actors.reward import METRICS, PROBE_REWARDS

    rewards, metric = [*METRICS, *PROBE_REWARDS], cfg.rollout.episode.reward_metric
    if metric not in rewards:
        raise ValueError(f"rollout.episode.reward_metric={metric!r}; expected one of {rewards}")
    if cfg.train.group_size < 2 and cfg.train.dynamic_filter:
        raise ValueError("train.dynamic_filter=true needs train.group_size >= 2: a group of one never varies")
    if cfg.train.group_size < 2 and cfg.train.algorithm in ("grpo", "dr_grpo", "rloo"):
        raise ValueError(f"train.group_size={cfg.train.group_size}: {cfg.train.algorithm} needs groups of 2 or more")


def kl_penalty(cfg: Config) -> str:
    """``loss`` or ``reward``: where the KL to the reference goes (``auto``: in the reward for PPO, as the paper)."""
    if cfg.train.kl_penalty == "auto":
        return "reward" if cfg.train.algorithm == "ppo" else "loss"
    return cfg.train.kl_penalty


def old_logprobs_source(cfg: Config, batch_size: int) -> str:
    """Where the PPO ratio's log π_old comes from for an update of ``batch_size`` trajectories (docs/training.md).

    ``none``: on-policy with one optimizer step, π_old is the learner's own π_θ before the step, so the ratio is 1
    by construction and the learner takes it from the forward it runs anyway (no extra pass). ``learner``: the
    learners recompute it before the update (verl's ``old_log_prob``): when an update takes several optimizer steps
    (mini-batches, epochs), when the KL goes in the reward (it reads π_old), or for TIS. ``engine``: off-policy
    without TIS, the engine's logprobs are the behaviour policy, and the ratio itself corrects the lag.
    """
    if cfg.train.max_staleness > 0 and cfg.learner.tis_cap is None:
        return "engine"
    if (cfg.learner.tis_cap is not None or kl_penalty(cfg) == "reward"
            or cfg.learner.optimizer_steps(batch_size) > 1):
        return "learner"
    return "none"


def policy_engine_options(cfg: Config) -> tuple[dict, dict[str, str]]:
    """The vLLM engine arguments and the environment of a policy ``RolloutActor``, from the model and cluster groups."""
    c = cfg.cluster
    engine_kwargs = dict(dtype=cfg.model.dtype, max_model_len=cfg.model.max_model_len, enforce_eager=True,
                         gpu_memory_utilization=c.gpu_memory_utilization, seed=cfg.seed,
                         tensor_parallel_size=c.rollout_tensor_parallel,
                         enable_prefix_caching=cfg.rollout.enable_prefix_caching)
    return engine_kwargs, {"VLLM_CPU_KVCACHE_SPACE": str(int(max(1, c.vllm_cpu_kvcache_gb)))}


def init_ray(cfg: Config) -> None:
    import ray

    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, log_to_driver=False)
        return
    # Logical CPUs: one per engine, learner and simulator server even on a 2-core machine; they share the cores.
    critics = cfg.cluster.critics if cfg.train.algorithm == "ppo" else 0
    needed = cfg.cluster.rollout_engines + cfg.cluster.learners + critics + cfg.cluster.simulator_servers + 1
    num_cpus = cfg.cluster.num_cpus or max(needed, os.cpu_count() or 1)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})


def _weights_dir(run_dir: Path) -> Path:
    """Shared memory when the machine has it: the engines read each new version without touching the disk."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else run_dir
    folder = base / f"zerosearch-ray-weights-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _masked_gap(samples) -> float:
    """Mean |log π_engine − log π_learner| over the model tokens: how far the sampler's numbers are from the
    learner's on the same weights (on CPU, fp32 both sides, this should be rounding noise)."""
    gaps = [abs(e - o) for s in samples for e, o, m in zip(s.rollout_logprobs, s.old_logprobs, s.loss_mask) if m]
    return statistics.fmean(gaps) if gaps else 0.0


def _mean_abs_gap(a: list[float], b: list[float]) -> float:
    return statistics.fmean(abs(x - y) for x, y in zip(a, b))


def _remove_older_weights(folder: Path, keep: str) -> None:
    for path in folder.glob("*.safetensors"):
        if str(path) != keep:
            path.unlink(missing_ok=True)


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class _StopFlag:
    """Ctrl-C asks the loop to checkpoint and exit after the current step instead of dying mid-write."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstop requested: finishing this step, then checkpointing (Ctrl-C again to abort)", file=sys.stderr)


if __name__ == "__main__":
    main()
