"""Does a policy explore the second search that two-hop questions need? Sampled as RL samples it, in one run.

    python bench/exploration.py [--model PATH] [--temperature 1.0] [--group-size 8] [--two-hop 24] [--single-hop 8]
                                [key=value ...]

GRPO can only reward a second search that some episode of a group made. For training questions of the synthetic
world (the default world, seed 0, as `make train` writes it), each is rolled out ``group-size`` times by the real
rollout actor at the training temperature (top-p 0.95), searching real BM25, with training's episode limits. Reported
per hop count: the share of episodes that searched twice, the share that answered, the mean F1 reward, the signal
share (groups whose rewards are not all equal), and on two-hop questions the share of episodes whose second search
retrieved the gold answer: the bridge found, which is what RL has to make common. ``ratio`` is the two-hop
second-search share; ``goal`` is 0.1, below which a 10-step run of 4 × 8 episodes rarely sees one that pays.

``opened_share`` counts the episodes whose second turn was opened for a search (``rollout.open_search_share=…``);
``twice_answered_share`` and ``twice_reward`` say whether the last turn answers after a second ``<information>``.
``bridge_read_share``: of the episodes that found the bridge, the share whose last thought holds the gold answer (it
read the block that has it), so reading and answering can be told apart.

``--model`` is an HF folder (default: the warm-up policy of the training config, built first when it is not in the
cache). ``key=value`` overrides that config as on the training command line (``warmup.name_query_share=0.5``).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def default_policy(cfg, files) -> str:
    """The warm-up policy `make train` starts from (from the cache, or built now)."""
    import tempfile

    from launch.assets import resolve_model
    from launch.driver.warmup import warm_up

    path, _ = warm_up(cfg, resolve_model(cfg.model.name), files["train"], files["corpus"], Path(tempfile.mkdtemp()))
    return path


def last_thought(response_text: str) -> str:
    thoughts = re.findall(r"<think>(.*?)</think>", response_text, re.DOTALL)
    return thoughts[-1] if thoughts else ""


def episode_row(trajectories, two_hop: bool) -> dict[str, float]:
    from simulator.tuning_data import contains_answer

    groups = collections.defaultdict(list)
    for t in trajectories:
        groups[t.group_id].append(t.reward)
    twice = [t for t in trajectories if t.stats.searches >= 2]
    row = {
        "episodes": len(trajectories),
        "second_search_share": round(len(twice) / len(trajectories), 3),
        "answered_share": round(statistics.fmean(t.stats.answered for t in trajectories), 3),
        "reward": round(statistics.fmean(t.reward for t in trajectories), 3),
        "signal_share": round(statistics.fmean(len(set(r)) > 1 for r in groups.values()), 3),
    }
    row["opened_share"] = round(statistics.fmean(t.stats.opened_searches > 0 for t in trajectories), 3)
    if twice:  # after a second <information>, does the last turn answer, and how well?
        row["twice_answered_share"] = round(statistics.fmean(t.stats.answered for t in twice), 3)
        row["twice_reward"] = round(statistics.fmean(t.reward for t in twice), 3)
    if two_hop:
        found = [t for t in twice if contains_answer("\n".join(t.stats.documents[1]), t.golden_answers)]
        row["bridge_found_share"] = round(len(found) / len(trajectories), 3)
        if found:
            row["bridge_found_reward"] = round(statistics.fmean(t.reward for t in found), 3)
            row["bridge_read_share"] = round(statistics.fmean(
                contains_answer(last_thought(t.response_text), t.golden_answers) for t in found), 3)
        # Groups where an episode that found the bridge outscored the group: the gradient RL needs.
        best = {g: max(r) for g, r in groups.items()}
        row["groups_with_a_bridge"] = round(statistics.fmean(
            any(t.group_id == g for t in found) for g in groups), 3)
        row["groups_paid_by_a_bridge"] = round(statistics.fmean(
            any(t.group_id == g and t.reward == best[g] > statistics.fmean(groups[g]) for t in found)
            for g in groups), 3)
        row["second_queries"] = [t.stats.queries[1] for t in twice[:8]]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--two-hop", type=int, default=24)
    parser.add_argument("--single-hop", type=int, default=8)
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--show", type=int, default=0, help="write this many episodes of each hop count to stderr")
    parser.add_argument("overrides", nargs="*", help="training config overrides, key=value")
    args = parser.parse_args()

    import ray
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from actors.dataset import load_qa
    from actors.group import RolloutGroup
    from actors.rollout import EpisodeRequest
    from launch.config import register_configs
    from launch.driver.cluster import init_ray, policy_engine_options
    from launch.paths import ensure_data
    from simulator.config import SearchConfig, SimulatorConfig
    from simulator.simulated import build_search_engine

    register_configs()
    with initialize_config_dir(str(Path(__file__).resolve().parent.parent / "conf"), version_base="1.3"):
        # No Hydra run folder here: the run_dir interpolation needs one.
        cfg = OmegaConf.to_object(compose("config", overrides=[*args.overrides, "logger.run_dir=unused"]))
    files = ensure_data(cfg.data)
    init_ray(cfg)
    try:
        model = args.model or default_policy(cfg, files)
        examples = load_qa(files["train"])
        chosen = ([e for e in examples if e.data_source.endswith("2hop")][:args.two_hop]
                  + [e for e in examples if e.data_source.endswith("1hop")][:args.single_hop])
        search = SearchConfig(engine="bm25", top_k=cfg.search.top_k)
        factory = functools.partial(build_search_engine, search, SimulatorConfig(), None, str(files["corpus"]))
        cfg.rollout.temperature = args.temperature
        engine_kwargs, env = policy_engine_options(cfg)
        group = RolloutGroup(model, engine_kwargs, factory, cfg.rollout, env)
        group.ready(cfg.cluster.actor_start_timeout_s)
        requests = [EpisodeRequest(e.uid, e.question, e.golden_answers, e.data_source, seed=i)
                    for i, e in enumerate(chosen)]
        started = time.perf_counter()
        by_source = collections.defaultdict(list)
        for finished in group.stream(requests, args.group_size, 0.0, started + args.timeout_s,
                                     temperature=args.temperature, what="exploration"):
            for t in finished:
                by_source[t.data_source].append(t)
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()

    rows = {source: episode_row(ts, source.endswith("2hop")) for source, ts in sorted(by_source.items())}
    for source, ts in sorted(by_source.items()):
        for t in ts[:args.show]:
            print(f"--- {source} reward {t.reward:.2f} gold {t.golden_answers}\n{t.response_text}\n",
                  file=sys.stderr)
    two_hop = next((r for s, r in rows.items() if s.endswith("2hop")), {"second_search_share": 0.0})
    print(json.dumps({"bench": "exploration", "ratio": two_hop["second_search_share"], "goal": 0.1,
                      "model": model, "temperature": args.temperature, "group_size": args.group_size,
                      "seconds": round(seconds, 1), **rows}, indent=1))


if __name__ == "__main__":
    main()
