"""The actors of one run and what the driver asks of them: ``Cluster`` places the policy engines, the simulator pool,
the learners, the critic and the reference from ``cfg.cluster``, and runs each stage of a step across them (rollout,
scoring, update, weight sync, validation, checkpoints). ``init_ray`` and ``policy_engine_options`` are the one recipe
for a local Ray instance and a policy engine's vLLM arguments, used by every entry point.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import time
from pathlib import Path
from typing import Any

from launch.assets import resolve_simulator
from launch.config import Config
from launch.driver.faults import FaultPlan, LearnerDiedError
from launch.driver.weight_sync import WeightSync


class Cluster:
    """The actors of one run, placed from ``cfg.cluster``: policy engines, simulator pool, learners, reference."""

    def __init__(self, cfg: Config, policy_path: str, corpus_path: str, run_dir: Path,
                 clock: StartupClock | None = None) -> None:
        clock = clock or StartupClock()
        # The engines' start is the longest path to the first step (a vLLM import in the actor, another in the engine
        # process it spawns), so they are asked for before the driver imports torch and transformers.
        import ray

        from actors.group import RolloutGroup
        from simulator.simulated import build_search_engine

        self.cfg = cfg
        self.closing = False
        c = cfg.cluster
        timeout = c.actor_start_timeout_s
        clock.lap("imports")
        self.run_dir = run_dir
        sim_cfg = placed_simulator(cfg)
        self.faults = FaultPlan(cfg.faults)
        self.faults_done: set[tuple[str, int]] = set()  # (fault, step): each happens once, whatever the rounds
        self.pool = None
        if cfg.search.engine == "simulated":
            from simulator.pool_actor import create_simulator_pool

            # Not waited for here: its servers load their model while the learners and the policy engines start.
            self.pool = create_simulator_pool(sim_cfg, wait=False, faults=self.faults.reply_faults(cfg.seed))
        # A picklable recipe: each rollout actor builds its own engine in its own process.
        search_factory = functools.partial(build_search_engine, cfg.search, sim_cfg, self.pool, corpus_path)
        engine_kwargs, env = policy_engine_options(cfg)
        validation_factory = None
        if cfg.train.val_every and cfg.train.val_engine != cfg.search.engine:
            real = dataclasses.replace(cfg.search, engine=cfg.train.val_engine)
            validation_factory = functools.partial(build_search_engine, real, sim_cfg, None, corpus_path)
        self.rollouts = RolloutGroup(policy_path, engine_kwargs, search_factory, cfg.rollout, env,
                                     num_engines=c.rollout_engines, num_gpus=c.rollout_gpus,
                                     validation_factory=validation_factory, weight_fault=self.faults.weight_fault(),
                                     start_timeout_s=timeout)
        self.engines = self.rollouts.actors
        from learners.group import LearnerGroup
        from learners.policy import PolicyActor
        from learners.reference import ReferenceActor

        learner_cfg = cfg.learner  # its total_steps is ${train.total_steps} unless set on purpose
        # A KL penalty in the reward replaces the KL loss term; the coefficient is the same key either way.
        self.kl_in_reward = learner_cfg.kl_coef if kl_penalty(cfg) == "reward" else 0.0
        policy_cfg = dataclasses.replace(learner_cfg, kl_coef=0.0) if self.kl_in_reward else learner_cfg
        self.learners = LearnerGroup(PolicyActor, c.learners, policy_path, policy_cfg, num_cpus=1,
                                     num_gpus=c.learner_gpus, timeout_s=timeout)
        clock.lap("learners")  # the engines start meanwhile
        self.critic = None
        if cfg.train.algorithm == "ppo":
            from learners.critic import CriticActor

            self.critic = LearnerGroup(CriticActor, c.critics, policy_path, cfg.critic, num_cpus=1,
                                       num_gpus=c.critic_gpus, timeout_s=timeout)
            clock.lap("critic")
        self.reference = None
        if learner_cfg.kl_coef > 0:
            self.reference = ray.remote(ReferenceActor).options(num_cpus=0.5, num_gpus=c.reference_gpus).remote(
                policy_path, bf16=learner_cfg.reference_bf16, offload=learner_cfg.offload_reference,
                micro_batch_tokens=learner_cfg.logprob_micro_batch_tokens, cpu_threads=learner_cfg.cpu_threads,
                share_prompts=learner_cfg.share_prompts)
        from transformers import AutoTokenizer  # while the engines still start

        tokenizer = AutoTokenizer.from_pretrained(policy_path)
        canary_ids = tokenizer.encode(cfg.train.canary_text, add_special_tokens=False)
        self.rollouts.ready(timeout)
        clock.lap("rollout_engines")  # what is left of their start once the learners (and the tokenizer) are up
        if self.pool is not None:
            from simulator.pool_actor import wait_for_pool

            wait_for_pool(self.pool, sim_cfg)
            clock.lap("simulator_pool")  # what is left of the servers' start once the engines are up
        self.weights = WeightSync(cfg, self.learners, self.engines, canary_ids, run_dir)
        clock.lap("weight_sync")
        self.rollouts.restore_weights = self.weights.restore  # a restarted engine gets the weights the others serve

    def sync_weights(self, version: int) -> dict[str, float]:
        return self.weights.sync(version)

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

        from actors.rollout import open_search_share_at
        from launch.driver.sampler import episode_requests

        deadline = time.perf_counter() + self.cfg.train.rollout_timeout_s
        share = open_search_share_at(self.cfg.rollout, step, self.cfg.train.total_steps)
        requests = episode_requests(prompts, self.cfg.seed, step, first_index, share)
        group_size = 1 if temperature == 0.0 else self.cfg.train.group_size  # greedy: one answer per question
        if self._inject("simulator", step, self.pool is not None and self.faults.kill_simulator(step)):
            ray.get(self.pool.arm_kill.remote(0), timeout=30)
            self.faults.injected["simulator_kills"] += 1
        # The rollout group counts the engine kills it made (none when the engine has a single group to run).
        kill_engine = 0 if self._inject("rollout", step, self.faults.kill_rollout(step)) else None
        trajectories = []
        try:
            for group in self.rollouts.stream(requests, group_size, noise_prob, deadline, temperature,
                                              validation_engine, abandoned=lambda: self.closing,
                                              what=f"rollout of step {step}", kill_engine=kill_engine):
                trajectories.extend(group)
        except TimeoutError as e:
            raise TimeoutError(f"{e} (train.rollout_timeout_s={self.cfg.train.rollout_timeout_s})") from e
        return trajectories

    def _inject(self, fault: str, step: int, due: bool) -> bool:
        """Whether ``fault`` happens now: due at ``step`` (a training step) and not yet injected in it."""
        if not due or step < 1 or (fault, step) in self.faults_done:
            return False
        self.faults_done.add((fault, step))
        return True

    def fault_metrics(self, batch) -> dict[str, float]:
        """``faults/*`` (only when a fault is configured): what was injected, the restarts and reruns, and how many
        of the step's episodes are missing."""
        import collections

        if self.cfg.faults == type(self.cfg.faults)():
            return {}
        sizes = collections.Counter(t.group_id for t in batch.trajectories)
        # With dynamic filtering the batch keeps only informative groups: count against those it kept.
        requested = batch.groups_kept if self.cfg.train.dynamic_filter else len(batch.prompt_uids)
        return self.faults.metrics(self.rollouts.counters, self.pool_stats(), list(sizes.values()),
                                   self.cfg.train.group_size, requested)

    def score(self, trajectories) -> tuple[list, dict[str, float]]:
        """Learner samples with everything the update needs: reference logprobs, critic values, advantages."""
        import ray

        from launch.driver.advantages import assign_advantages, learner_samples

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
            metrics["rollout/engine_vs_learner_logprob_gap"] = masked_gap(samples)
        elif source == "engine":
            for sample in samples:
                sample.old_logprobs = list(sample.rollout_logprobs)
        if self.critic is not None:
            for sample, values in zip(samples, self.critic.values(samples)):
                sample.old_values = values
        metrics.update(assign_advantages(samples, trajectories, t.algorithm, self.kl_in_reward, t.gamma, t.lam))
        return samples, metrics

    def update(self, samples, step: int) -> tuple[dict[str, float], float]:
        import ray

        started = time.perf_counter()
        if self._inject("learner", step, self.faults.kill_learner(step)):
            ray.kill(self.learners.actors[0], no_restart=True)
            self.faults.injected["learner_kills"] += 1
        try:
            metrics = self.learners.train_step(samples)
            if self.critic is not None:
                metrics.update(self.critic.train_step(samples))
        except ray.exceptions.RayActorError as error:
            raise LearnerDiedError(self._learner_death(step, error)) from error
        return metrics, time.perf_counter() - started

    def _learner_death(self, step: int, error: BaseException) -> str:
        from launch.driver.checkpoint import find_checkpoint

        last = find_checkpoint(self.run_dir, "auto")
        where = (f"the last checkpoint is {last}: rerun with resume=auto (or resume={self.run_dir}) to continue from "
                 f"it" if last is not None else "no checkpoint was written yet (train.save_every): the run starts over")
        return (f"a learner actor died during the update of step {step} ({type(error).__name__}). Its optimizer state "
                f"is lost, so the run stops; {where}.")

    def raw_throughput(self, trajectories, rollout_tokens_per_s: float) -> dict[str, float]:
        """Plain vLLM ``generate`` at the last step's volume (its prompts, its mean tokens per episode), on the same
        engines, against the multi-turn rollout's tokens/s: what searching, observation prefill and turn-taking cost."""

        prompts = [t.prompt_ids for t in trajectories]
        max_tokens = max(1, round(statistics.fmean(t.stats.generated_tokens for t in trajectories)))
        started = time.perf_counter()
        self.rollouts.raw_generate(prompts, max_tokens, timeout_s=self.cfg.train.rollout_timeout_s)
        raw = len(prompts) * max_tokens / (time.perf_counter() - started)
        return {"perf/raw_generate_tokens_per_s": raw, "perf/rollout_tokens_per_s": rollout_tokens_per_s,
                "perf/rollout_vs_raw": rollout_tokens_per_s / raw}

    def close(self) -> None:
        self.closing = True
        if hasattr(self, "weights"):
            self.weights.close()

    def checkpoint(self, root: Path, step: int, curriculum, sampler_state: dict, export_hf: bool,
                   replay_state: dict | None = None) -> Path:
        """DeepSpeed states (policy, critic), the driver's state and (at the end) an HF export, under
        ``root/step_<k>``. ``driver_state.json`` goes last: its presence marks the checkpoint complete."""
        from launch.driver.checkpoint import DRIVER_STATE, atomic_write_json, rng_state

        folder = root / f"step_{step}"
        folder.mkdir(parents=True, exist_ok=True)
        self.learners.save_checkpoint(str(folder / "deepspeed"))
        if self.critic is not None:
            self.critic.save_checkpoint(str(folder / "critic"))
        if export_hf:
            self.learners.export_hf(str(folder / "hf"))
        state = {"step": step, "curriculum": curriculum.state_dict(), "sampler": sampler_state, "rng": rng_state()}
        if replay_state is not None:
            state["replay"] = replay_state
        atomic_write_json(folder / DRIVER_STATE, state)
        return folder

    def restore(self, folder: Path, curriculum, sampler, replay=None) -> int:
        """Load a checkpoint written by ``checkpoint`` and put its weights on the engines; return its step."""
        from launch.driver.checkpoint import read_driver_state, set_rng_state

        state = read_driver_state(folder)
        self.learners.load_checkpoint(str(folder / "deepspeed"))
        if self.critic is not None:
            self.critic.load_checkpoint(str(folder / "critic"))
        curriculum.load_state_dict(state["curriculum"])
        sampler.load_state_dict(state["sampler"])
        if replay is not None and "replay" in state:
            replay.load_state_dict(state["replay"])
        set_rng_state(state["rng"])
        self.sync_weights(version=state["step"])
        return int(state["step"])

    def pool_stats(self) -> dict[str, Any]:
        import ray

        if self.pool is None:
            return {}
        return ray.get(self.pool.stats.remote(), timeout=30)


class StartupClock:
    """Seconds of each start-up stage, in order; a stage's time is what the driver waited for it."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._started = self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = now - self._last
        self._last = now

    def total(self) -> dict[str, float]:
        """The laps so far and their ``total``."""
        return {**self.laps, "total": self._last - self._started}


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


def placed_simulator(cfg: Config):
    """The simulator servers to start: the simulator group says what they run (its model path resolved), the cluster
    group where and how many."""
    c = cfg.cluster
    return dataclasses.replace(resolve_simulator(cfg.simulator), num_servers=c.simulator_servers,
                               gpus_per_server=c.simulator_gpus, tensor_parallel_size=c.simulator_tensor_parallel)


def policy_engine_options(cfg: Config) -> tuple[dict, dict[str, str]]:
    """The one recipe for a policy engine, in training, evaluation and inference, from the model and cluster groups:
    its ``AsyncEngineArgs`` keyword arguments and the environment its engine process reads at start (on CPU: the KV
    cache's size in GiB, and the engine's OpenMP threads)."""
    c = cfg.cluster
    engine_kwargs = dict(dtype=cfg.model.dtype, max_model_len=cfg.model.max_model_len, enforce_eager=True,
                         gpu_memory_utilization=c.gpu_memory_utilization, seed=cfg.seed,
                         tensor_parallel_size=c.rollout_tensor_parallel,
                         enable_prefix_caching=cfg.rollout.enable_prefix_caching)
    if c.kv_block_size:
        engine_kwargs["block_size"] = c.kv_block_size
    if c.rollout_gpus:
        return engine_kwargs, {}
    return engine_kwargs, {"VLLM_CPU_KVCACHE_SPACE": str(int(max(1, c.vllm_cpu_kvcache_gb))),
                           "OMP_NUM_THREADS": str(c.rollout_cpu_threads or engine_cpu_share(c.rollout_engines,
                                                                                            computing_beside(cfg)))}


def computing_beside(cfg: Config) -> int:
    """The processes that compute while the policy engines generate: the simulator servers when the search is
    simulated, and the learners when rollouts run ahead of training (``train.max_staleness`` > 0). In the on-policy
    loop the learners wait while the engines generate, and the engines wait while the learners train."""
    simulators = cfg.cluster.simulator_servers if cfg.search.engine == "simulated" else 0
    return simulators + (cfg.cluster.learners if cfg.train.max_staleness > 0 else 0)


def engine_cpu_share(engines: int, beside: int = 0) -> int:
    """An even share of the cores this process may use for each of ``engines`` engines, with ``beside`` other
    processes computing at the same time (at least one core)."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, engines + beside))


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


def masked_gap(samples) -> float:
    """Mean |log π_engine − log π_learner| over the model tokens: how far the sampler's numbers are from the
    learner's on the same weights (on CPU, fp32 both sides, this should be rounding noise). A trained token the
    engine did not sample (an opened search tag, ``rollout.open_search_trains_tag``) carries logprob 0.0 and is left
    out: its gap is the policy's own doubt about the tag, not the engines' disagreement."""
    gaps = [abs(e - o) for s in samples for e, o, m in zip(s.rollout_logprobs, s.old_logprobs, s.loss_mask)
            if m and e != 0.0]
    return statistics.fmean(gaps) if gaps else 0.0
