"""The training driver: ``python -m launch.train [group=option ...] [key=value ...]``.

    python -m launch.train --cfg job            # print the composed config and exit
    python -m launch.train model=tiny_llama     # the default job on the tiny test model

One RL step, as in the paper's algorithm box:
    1. sample B prompts; each is rolled out n times (a group)
    2. read the noise probability p from the curriculum
    3. roll out: vLLM policy engines run multi-turn search episodes against the (simulated) engine
       (1-3 run in the background, up to ``train.max_staleness`` steps ahead: ``launch/driver/pipeline.py``)
    4. reference logprobs, critic values (PPO); advantages from the rewards (GRPO: group mean and std)
    5. one policy update on the learners (observation tokens masked); the critic's update (PPO)
    6. publish the new weights; the engines load them in place; a canary checks they agree with the learner
    7. advance the curriculum; log; checkpoint every k steps
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from launch.config import Config, register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(dict_cfg: DictConfig) -> None:
    from launch.driver.checkpoint import run_folder

    run_dir = run_folder(dict_cfg.resume, Path(dict_cfg.logger.run_dir))
    cfg: Config = OmegaConf.to_object(dict_cfg)  # typed dataclasses from here on
    train(cfg, run_dir, OmegaConf.to_container(dict_cfg, resolve=True))


def train(cfg: Config, run_dir: Path, config_dict: dict[str, Any]) -> dict[str, Any]:
    import ray

    from actors.dataset import load_qa
    from launch.assets import resolve_model
    from launch.driver.checkpoint import atomic_write_json, find_checkpoint
    from launch.driver.cluster import Cluster, StartupClock, init_ray
    from launch.driver.metrics import Progress, sample_rows, step_metrics
    from launch.driver.pipeline import RolloutQueue
    from launch.driver.replay import SuccessReplay
    from launch.driver.run_logger import RunLogger
    from launch.driver.sampler import PromptSampler
    from launch.driver.warmup import warm_up
    from launch.paths import ensure_data
    from simulator.curriculum import build_curriculum

    _check(cfg)
    files = ensure_data(cfg.data)
    train_examples = load_qa(files["train"])
    _check_inputs(cfg, files, len(train_examples))
    sampler = PromptSampler(train_examples, seed=cfg.seed, shuffle=cfg.data.shuffle, stratify=cfg.data.stratify)
    val_examples = load_qa(files["val"])[: cfg.train.val_samples] if cfg.train.val_every else []
    curriculum = build_curriculum(cfg.curriculum)
    replay = SuccessReplay(cfg.replay)
    policy_path = resolve_model(cfg.model.name)
    checkpoint = find_checkpoint(run_dir, cfg.resume)
    logger = RunLogger(run_dir, cfg.logger.wandb, cfg.logger.run_name, config_dict, resume=checkpoint is not None)
    print(f"run folder: {run_dir}", flush=True)

    clock = StartupClock()
    init_ray(cfg)
    clock.lap("ray")
    stop = _StopFlag()
    cluster = rollouts = None
    try:
        # Cold start of small policies: SFT on protocol demonstrations (train.warmup=auto|on|off).
        policy_path, warmup = warm_up(cfg, policy_path, files["train"], files["corpus"], run_dir)
        if warmup:
            atomic_write_json(run_dir / "warmup.json", warmup)
        clock.lap("warmup")
        cluster = Cluster(cfg, policy_path, str(files["corpus"]), run_dir, clock)
        first = 1
        if checkpoint is not None:
            first = cluster.restore(checkpoint, curriculum, sampler, replay) + 1
            dropped = logger.truncate_after(first - 1)
            clock.lap("restore")
            print(f"resumed from {checkpoint} (step {first - 1}; {dropped} later metrics rows dropped)", flush=True)
        startup_s = clock.total()
        print("start-up " + ", ".join(f"{k} {v:.1f}s" for k, v in startup_s.items()), flush=True)
        rollouts = RolloutQueue(cluster.rollout, sampler, curriculum, cfg.train.prompts_per_step,
                                cfg.train.total_steps, cfg.train.max_staleness, cfg.train.rollout_timeout_s,
                                cfg.train.dynamic_filter, cfg.train.dynamic_filter_rounds, replay)
        progress = Progress(cfg.train.total_steps, first - 1)
        step = first - 1
        for step in range(first, cfg.train.total_steps + 1):
            t_step = time.perf_counter()
            rollouts.fill(step)                                                          # 1-3, K steps ahead
            batch, t_wait = rollouts.take(step)                                          # 1-3
            if cfg.train.skip_update_without_signal and batch.groups_informative == 0:
                score_metrics, t_score, train_metrics, t_train = {}, 0.0, {"train/update_skipped": 1.0}, 0.0
            else:
                t_score = time.perf_counter()
                samples, score_metrics = cluster.score(batch.trajectories)              # 4
                t_score = time.perf_counter() - t_score
                train_metrics, t_train = cluster.update(samples, step)                   # 5
                train_metrics["train/update_skipped"] = 0.0
            t_idle = rollouts.wait_idle()  # weights change only between rollouts
            sync_metrics = cluster.sync_weights(version=step)                            # 6
            metrics = step_metrics(batch, {**score_metrics, **train_metrics}, sync_metrics, t_score, t_train,
                                    time.perf_counter() - t_step, t_wait, t_idle, cluster)
            if cfg.train.val_every and step % cfg.train.val_every == 0:  # the engines are idle since the sync
                metrics.update(cluster.validate(val_examples))
            curriculum.observe(metrics["critic/score/mean"])                            # 7
            logger.log(step, metrics, sample_rows(batch.trajectories, cfg.logger.wandb.sample_table_rows),
                       {"prompts": batch.prompt_uids, "noise_prob": batch.noise_prob,
                        "policy_versions": sorted({t.policy_version for t in batch.trajectories})})
            progress.show(step, metrics)
            if stop.requested:
                break
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.total_steps:
                cluster.checkpoint(run_dir / "checkpoints", step, curriculum, batch.sampler_state, export_hf=False,
                                   replay_state=batch.replay_state)
        progress.close()
        final = cluster.checkpoint(run_dir / "checkpoints", step, curriculum, batch.sampler_state,
                                   export_hf=cfg.train.export_hf, replay_state=batch.replay_state
                                   ) if step >= first else checkpoint
        if stop.requested:
            print(f"interrupted after step {step}: checkpoint written, exiting", flush=True)
        probe = {}
        if cfg.train.throughput_probe and not stop.requested and step >= first:
            probe = cluster.raw_throughput(batch.trajectories, metrics["perf/tokens_per_s"])
        plot = logger.plot()
        wandb_dir = logger.finish()
        summary = {"run_dir": str(run_dir), "metrics": str(logger.metrics_path), "plot": str(plot),
                   "checkpoint": str(final), "wandb": wandb_dir, "steps": step, "policy_start": policy_path,
                   "startup_s": {k: round(v, 2) for k, v in startup_s.items()}, **probe}
        atomic_write_json(run_dir / "summary.json", summary)
        print("\n".join(f"{k}: {v}" for k, v in summary.items()), flush=True)
        return summary
    finally:
        if rollouts is not None:
            rollouts.close()
        if cluster is not None:
            cluster.close()
        ray.shutdown()


def _check(cfg: Config) -> None:
    from launch.driver.cluster import kl_penalty
    from learners.config import ALGORITHMS, GROUP_BASELINE_ALGORITHMS, TOKEN_REWARD_ALGORITHMS

    if cfg.train.algorithm not in ALGORITHMS:
        raise ValueError(f"train.algorithm={cfg.train.algorithm!r}; expected one of {list(ALGORITHMS)}")
    if cfg.cluster.weight_sync not in ("file", "nccl", "gloo"):
        raise ValueError(f"cluster.weight_sync={cfg.cluster.weight_sync!r}; expected file, nccl or gloo")
    if cfg.train.max_staleness < 0:
        raise ValueError(f"train.max_staleness={cfg.train.max_staleness}; expected 0 (on-policy) or more")
    if cfg.train.kl_penalty not in ("auto", "loss", "reward"):
        raise ValueError(f"train.kl_penalty={cfg.train.kl_penalty!r}; expected auto, loss or reward")
    if kl_penalty(cfg) == "reward" and cfg.train.algorithm not in TOKEN_REWARD_ALGORITHMS:
        raise ValueError(f"train.kl_penalty=reward needs per-token rewards: train.algorithm must be one of "
                         f"{list(TOKEN_REWARD_ALGORITHMS)}, got {cfg.train.algorithm!r}")
    if cfg.resume not in ("off", "auto") and not Path(cfg.resume).is_dir():
        raise ValueError(f"resume={cfg.resume!r}: expected off, auto, or an existing run folder")
    from actors.reward import METRICS, PROBE_REWARDS

    rewards, metric = [*METRICS, *PROBE_REWARDS], cfg.rollout.episode.reward_metric
    if metric not in rewards:
        raise ValueError(f"rollout.episode.reward_metric={metric!r}; expected one of {rewards}")
    if cfg.train.skip_update_without_signal and cfg.train.algorithm not in GROUP_BASELINE_ALGORITHMS:
        raise ValueError(f"train.skip_update_without_signal=true needs a group-baseline estimator, one of "
                         f"{list(GROUP_BASELINE_ALGORITHMS)}: under train.algorithm={cfg.train.algorithm!r} a step "
                         f"whose groups all scored alike still has advantages to learn from")
    if cfg.train.group_size < 2 and cfg.train.dynamic_filter:
        raise ValueError("train.dynamic_filter=true needs train.group_size >= 2: a group of one never varies")
    if cfg.train.group_size < 2 and cfg.train.algorithm in ("grpo", "dr_grpo", "rloo"):
        raise ValueError(f"train.group_size={cfg.train.group_size}: {cfg.train.algorithm} needs groups of 2 or more")
    if cfg.train.group_size < 1 or cfg.train.prompts_per_step < 1:
        raise ValueError(f"train.group_size={cfg.train.group_size}, train.prompts_per_step="
                         f"{cfg.train.prompts_per_step}: expected 1 or more each")
    if cfg.rollout.prompt not in ("agent", "rag"):
        raise ValueError(f"rollout.prompt={cfg.rollout.prompt!r}; expected agent (the paper's search prompt) or rag")
    if cfg.rollout.episode.max_turns < 0:
        raise ValueError(f"rollout.episode.max_turns={cfg.rollout.episode.max_turns}: expected 0 or more searches")


def _check_inputs(cfg: Config, files: dict[str, Path], train_questions: int) -> None:
    """What can be checked of the data and the models before any actor starts; an actor's error would bury it."""
    from launch.assets import resolve_model
    from simulator.corpus import check_corpus

    if cfg.train.prompts_per_step > train_questions:
        raise ValueError(f"train.prompts_per_step={cfg.train.prompts_per_step}, but {files['train']} has "
                         f"{train_questions} questions: expected at most that many prompts per step")
    if cfg.search.engine == "simulated":  # the policy's own path is resolved by the caller, also before Ray
        resolve_model(cfg.simulator.model)
    # The corpus feeds BM25/dense training search, BM25 validation and the warm-up's demonstrations.
    check_corpus(files["corpus"])


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
