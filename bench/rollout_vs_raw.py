"""Multi-turn rollout throughput against plain vLLM ``generate`` on the same engine, measured in one run.

    python bench/rollout_vs_raw.py [--prompts 8] [--group 4] [overrides ...]

Starts one policy ``RolloutActor`` as training does (``launch.driver.cluster.policy_engine_options``: the training
config's model, dtype and engine settings; the warmed-up policy, from the warm-up cache), searching real BM25 so that no
simulator shares the cores. It runs ``--prompts`` training questions × ``--group`` episodes of the search protocol,
then plain single-turn ``generate`` of the same prompts at the same mean number of generated tokens per episode
(``raw_generate``: every request at once, no stop strings, no searches, no observation prefill). ``ratio`` is the
rollout's generated tokens/s over the plain one's; ``goal`` is 0.85. ``ratio_same_work`` compares against a third
pass that does the rollout's work in one go: each prompt followed by its episode's observation tokens, generating
as many tokens as that episode did, so that it prefills and decodes what the rollout did and leaves out only the
turns. Every pass samples as training does (temperature, top-p, top-k). The episodes' own time split (generation,
search) is reported beside it, so that a miss says where the time went. Any Hydra override of the training config
applies (``rollout.enable_prefix_caching=false``, ``model.dtype=bfloat16``, ``search=simulated`` to put the simulator
pool in place). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GOAL = 0.85


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from launch.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose("config", overrides=["search=bm25", *overrides,
                                                                      "logger.run_dir=unused"]))


def observation_ids(episode) -> list[int]:
    """The tokens the environment wrote into an episode (loss mask 0): what its later turns had to prefill."""
    return [token for token, mask in zip(episode.response_ids, episode.loss_mask) if not mask]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    args, overrides = parser.parse_known_args()
    cfg = compose(overrides)

    import dataclasses
    import functools

    import ray

    from actors.dataset import load_qa
    from actors.rollout import RolloutActor
    from launch.assets import resolve_model
    from launch.driver.cluster import init_ray, policy_engine_options
    from launch.driver.sampler import PromptSampler, episode_requests
    from launch.driver.warmup import warm_up
    from launch.paths import ensure_data
    from simulator.simulated import build_search_engine

    files = ensure_data(cfg.data)
    init_ray(cfg)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            policy, _ = warm_up(cfg, resolve_model(cfg.model.name), files["train"], files["corpus"], Path(tmp))
            pool = None
            if cfg.search.engine == "simulated":
                from launch.assets import resolve_simulator
                from simulator.pool_actor import create_simulator_pool

                pool = create_simulator_pool(dataclasses.replace(resolve_simulator(cfg.simulator),
                                                                 num_servers=cfg.cluster.simulator_servers))
            search = functools.partial(build_search_engine, cfg.search, cfg.simulator, pool, str(files["corpus"]))
            engine_kwargs, env = policy_engine_options(cfg)
            actor = ray.remote(RolloutActor).options(num_cpus=1, max_concurrency=10_000).remote(
                policy, engine_kwargs, search, cfg.rollout, env)
            ray.get(actor.ready.remote(), timeout=cfg.cluster.actor_start_timeout_s)
            prompts = PromptSampler(load_qa(files["train"]), seed=cfg.seed).next(args.prompts)
            requests = episode_requests(prompts, cfg.seed, step=1)
            limit = cfg.train.rollout_timeout_s

            started = time.perf_counter()
            stream = actor.rollout.options(num_returns="streaming").remote(requests, args.group, 0.0)
            episodes = [t for ref in stream for t in ray.get(ref, timeout=limit)]
            rollout_s = time.perf_counter() - started
            generated = sum(t.stats.generated_tokens for t in episodes)
            per_episode = max(1, round(generated / len(episodes)))
            raw = ray.get(actor.raw_generate.remote([t.prompt_ids for t in episodes], per_episode), timeout=limit)
            # The same work in one pass: each prompt followed by its episode's observation tokens, decoding as many
            # tokens as that episode did, so that the engine prefills and decodes what the rollout did. What remains
            # is the turns themselves: a later turn waits for the one before it.
            matched = ray.get(actor.raw_generate.remote([t.prompt_ids + observation_ids(t) for t in episodes],
                                                        [max(1, t.stats.generated_tokens) for t in episodes]),
                              timeout=limit)
    finally:
        ray.shutdown()

    rollout_tps = generated / rollout_s
    print(json.dumps({
        "ratio": round(rollout_tps / raw["tokens_per_s"], 3),
        "goal": GOAL,
        "rollout_tokens_per_s": round(rollout_tps, 1),
        "raw_generate_tokens_per_s": round(raw["tokens_per_s"], 1),
        "ratio_same_work": round(rollout_tps / matched["tokens_per_s"], 3),
        "raw_same_work_tokens_per_s": round(matched["tokens_per_s"], 1),
        "episodes": len(episodes),
        "generated_tokens": generated,
        "tokens_per_episode": per_episode,
        "tokens_per_episode_max": max(t.stats.generated_tokens for t in episodes),
        "turns_per_episode": round(statistics.fmean(t.stats.turns for t in episodes), 2),
        "searches_per_episode": round(statistics.fmean(t.stats.searches for t in episodes), 2),
        "observation_tokens_per_episode": round(statistics.fmean(t.stats.observation_tokens for t in episodes), 1),
        "rollout_s": round(rollout_s, 2),
        "raw_s": round(raw["seconds"], 2),
        "raw_same_work_s": round(matched["seconds"], 2),
        "episode_generation_s_mean": round(statistics.fmean(t.stats.generation_s for t in episodes), 2),
        "episode_search_s_mean": round(statistics.fmean(t.stats.search_s for t in episodes), 3),
        "search": cfg.search.engine,
        "dtype": cfg.model.dtype,
        "prefix_caching": bool(engine_kwargs.get("enable_prefix_caching", False)),
        "kv_block_size": engine_kwargs.get("block_size"),
    }, indent=2))


if __name__ == "__main__":
    main()
