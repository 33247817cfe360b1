"""Evaluate a policy on QA benchmarks with a real (or simulated) search engine, next to the paper's baselines.

    python -m launch.evaluate model.name=smollm2-135m-instruct
    python -m launch.evaluate model.name=runs/2026-01-01/12-00-00 data.dir=/data/flashrag eval.limit=500 search=http
    python -m launch.evaluate model.name=Qwen/Qwen2.5-3B data.dir=/data/zerosearch eval.benchmarks=[nq,hotpotqa] \
        eval.methods=[agent]

Methods, all greedy, on the same questions and engine:
    direct   the question alone, answer in <answer> (the paper's Direct row)
    rag      the top-k documents for the question in the prompt, then answer (RAG)
    agent    the search protocol the policy is trained on, up to ``rollout.episode.max_turns`` searches (ZeroSearch)

The config is training's (``conf/evaluate.yaml`` is ``conf/config.yaml`` with real BM25 as the engine), so every
override means what it means for training: ``model.*``, ``data.*``, ``search=...``/``search.*``, ``simulator.*``,
``rollout.episode.*``, ``cluster.*``, ``seed``; the evaluation's own keys are ``eval.*`` (``EvalConfig``). The policy
(``model.name``) is an asset name, an HF folder or hub id, or a training run folder (its newest HF export is used).
``data.dir`` is searched for the benchmarks by name (``launch/benchmarks.py``); the default is the synthetic world,
whose test split is the benchmark ``synthetic``. The tables go to the run folder (``logger.run_dir``) as ``results.md``,
``results.csv`` and ``results.json``, every answer to ``records.jsonl``, and to W&B (``logger.wandb.mode``).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from launch.command_config import EVAL_METHODS
from launch.config import Config, register_configs

register_configs()


def _benchmarks(cfg: Config) -> tuple[Path, dict[str, list], Path]:
    """The data folder, the questions of each benchmark to run, and the corpus (``search.corpus_file``, else the data
    folder's ``data.corpus_file``)."""
    from actors.evaluation import BENCHMARKS
    from launch.benchmarks import SYNTHETIC, BenchmarkNotFound, benchmark_examples
    from launch.paths import ensure_data, resolve

    data_dir = resolve(cfg.data.dir)
    if not data_dir.exists() and cfg.data.generate_synthetic:
        ensure_data(cfg.data)  # the synthetic world, generated where it is configured to live
    found, missing = {}, []
    for name in cfg.eval.benchmarks or [SYNTHETIC, *BENCHMARKS]:
        try:
            found[name] = benchmark_examples(data_dir, name, cfg.eval.limit)
        except BenchmarkNotFound:
            if cfg.eval.benchmarks:  # asked for by name: an error
                raise
            missing.append(name)
    if found and missing:
        print(f"benchmarks in {data_dir}: {', '.join(found)} (not there: {', '.join(missing)})", flush=True)
    if not found:
        raise FileNotFoundError(f"no benchmark found under {data_dir} (data.dir): expected the synthetic world's "
                                f"test split or FlashRAG benchmark files (launch/benchmarks.py)")
    corpus = resolve(cfg.search.corpus_file) if cfg.search.corpus_file else data_dir / cfg.data.corpus_file
    return data_dir, found, corpus


def in_flight_chunks(requests: list, per_engine: int, engines: int) -> list[list]:
    """``requests`` in consecutive chunks of ``per_engine`` per engine (0: one chunk), run one after another."""
    size = per_engine * engines if per_engine > 0 else len(requests)
    return [requests[i:i + size] for i in range(0, len(requests), max(size, 1))]


def check_engine(engine: str, corpus: Path, url: str, timeout_s: float = 10.0) -> None:
    """Fail before any actor starts when the engine cannot serve: an unknown name, a local engine without a readable
    corpus, a SerpAPI key not set, or a retriever that does not answer. An engine that fails inside a rollout actor
    answers "No information available" to every search instead, and the whole evaluation would score that."""
    import asyncio

    from simulator.config import SEARCH_ENGINES
    from simulator.corpus import check_corpus
    from simulator.remote import HttpRetriever, SerpApiSearch

    if engine not in SEARCH_ENGINES:
        raise ValueError(f"search.engine={engine!r}; expected one of {list(SEARCH_ENGINES)}")
    if engine in ("bm25", "dense"):
        check_corpus(corpus)
    elif engine == "serpapi":
        SerpApiSearch()  # raises, naming the variable, when the key is not set
    elif engine == "http":
        result = asyncio.run(HttpRetriever(url, timeout_s=timeout_s, retries=0).search("health check"))
        if result.meta.failed:
            raise ConnectionError(f"the retriever at {url} did not answer ({result.meta.error}); start one with "
                                  f"`python -m launch.serve_retriever`, or set search.url=")


def evaluate(cfg: Config) -> dict[str, Any]:
    """Every method of ``cfg.eval`` on every benchmark, greedily, with the policy ``cfg.model.name``; the results
    by method, also written to the run folder ``cfg.logger.run_dir``."""
    import ray

    from actors.evaluation import EvalRecord, flat_rows, markdown_table, summarize
    from actors.group import RolloutGroup
    from actors.rollout import EpisodeRequest
    from launch.assets import resolve_policy
    from launch.driver.cluster import init_ray, placed_simulator, policy_engine_options
    from simulator.simulated import build_search_engine

    unknown = [m for m in cfg.eval.methods if m not in EVAL_METHODS]
    if unknown:
        raise ValueError(f"eval.methods={unknown}: expected any of {list(EVAL_METHODS)}")
    policy = resolve_policy(cfg.model.name)
    _, benchmarks, corpus = _benchmarks(cfg)
    check_engine(cfg.search.engine, corpus, cfg.search.url)
    out = Path(cfg.logger.run_dir)
    out.mkdir(parents=True, exist_ok=True)

    init_ray(cfg)
    try:
        pool, sim_cfg = None, cfg.simulator
        if cfg.search.engine == "simulated":
            from simulator.pool_actor import create_simulator_pool

            sim_cfg = placed_simulator(cfg)
            pool = create_simulator_pool(sim_cfg, wait=False)  # its servers load while the policy engines start
        factory = functools.partial(build_search_engine, cfg.search, sim_cfg, pool,
                                    str(corpus) if corpus.is_file() else None)
        rollout_cfg = dataclasses.replace(cfg.rollout, temperature=0.0)
        engine_kwargs, env = policy_engine_options(cfg)
        engines = RolloutGroup(policy, engine_kwargs, factory, rollout_cfg, env,
                               num_engines=cfg.cluster.rollout_engines, num_gpus=cfg.cluster.rollout_gpus,
                               start_timeout_s=cfg.cluster.actor_start_timeout_s)
        engines.ready(cfg.cluster.actor_start_timeout_s)
        if pool is not None:
            from simulator.pool_actor import wait_for_pool

            wait_for_pool(pool, sim_cfg)

        records: dict[str, list[EvalRecord]] = {m: [] for m in cfg.eval.methods}
        timings: dict[str, float] = {}
        for name, examples in benchmarks.items():
            requests = [EpisodeRequest(e.uid, e.question, e.golden_answers, name, seed=cfg.seed * 1_000_003 + i)
                        for i, e in enumerate(examples)]
            for method in cfg.eval.methods:
                started = time.perf_counter()
                if method == "agent":
                    deadline = started + cfg.eval.timeout_s
                    by_uid = {t.group_id: t for chunk in in_flight_chunks(requests, cfg.eval.in_flight,
                                                                          len(engines.actors))
                              for group in engines.stream(chunk, 1, 0.0, deadline, temperature=0.0,
                                                          what=f"agent on {name}")
                              for t in group}
                    found = [EvalRecord.from_trajectory(name, e.question, by_uid[e.uid]) for e in examples]
                else:
                    rows = engines.answer(requests, method == "rag", cfg.search.top_k, cfg.eval.timeout_s)
                    found = [EvalRecord(name, e.uid, e.question, e.golden_answers, **row)
                             for e, row in zip(examples, rows)]
                timings[f"{method}/{name}"] = time.perf_counter() - started
                records[method] += found
                print(f"{method:>6} {name}: {len(found)} questions in {timings[f'{method}/{name}']:.1f}s", flush=True)
    finally:
        ray.shutdown()

    results = {method: summarize(recs) for method, recs in records.items()}
    tables = "\n\n".join(markdown_table(results, metric) for metric in ("subem", "em", "f1", "searches", "tokens",
                                                                          "invalid_rate"))
    header = (f"model `{cfg.model.name}`, engine `{cfg.search.engine}` (top {cfg.search.top_k}), greedy, max_turns "
              f"{cfg.rollout.episode.max_turns}, up to {cfg.eval.limit} questions per benchmark\n\n")
    (out / "results.md").write_text(header + tables + "\n")
    config = OmegaConf.to_container(OmegaConf.structured(cfg))
    (out / "results.json").write_text(json.dumps({"config": config, "results": results, "timings_s": timings},
                                                 indent=2))
    rows = flat_rows(results)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "records.jsonl", "w") as f:
        for method, recs in records.items():
            for r in recs:
                f.write(json.dumps({"method": method, **asdict(r)}) + "\n")
    if cfg.logger.wandb.mode != "disabled":
        import wandb

        run = wandb.init(project=f"{cfg.logger.wandb.project}-eval", mode=cfg.logger.wandb.mode, dir=str(out),
                         config=config)
        run.log({"results": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
        run.finish()
    print(header + tables, flush=True)
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(dict_cfg: DictConfig) -> None:
    evaluate(OmegaConf.to_object(dict_cfg))


if __name__ == "__main__":
    main()
