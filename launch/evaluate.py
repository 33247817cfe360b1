"""Evaluate a policy on QA benchmarks with a real (or simulated) search engine, next to the paper's baselines.

    python -m launch.evaluate model=smollm2-135m-instruct data=synthetic engine=bm25
    python -m launch.evaluate model=runs/2026-01-01/12-00-00 data=/data/flashrag limit=500 engine=http
    python -m launch.evaluate model=Qwen/Qwen2.5-3B data=/data/zerosearch benchmarks=[nq,hotpotqa] methods=[agent]

Methods, all greedy, on the same questions and engine:
    direct   the question alone, answer in <answer> (the paper's Direct row)
    rag      the top-k documents for the question in the prompt, then answer (RAG)
    agent    the search protocol the policy is trained on, up to ``max_turns`` searches (ZeroSearch)

``model`` is an asset name, an HF folder or hub id, or a training run folder (its newest HF export is used).
``data=synthetic`` evaluates on the synthetic world's test split; a folder is searched for the benchmarks by name
(``launch/benchmarks.py``). The tables go to the output folder as ``results.md``, ``results.csv`` and
``results.json``, every answer to ``records.jsonl``, and to W&B when ``wandb`` is not ``disabled``.
"""

from __future__ import annotations

import csv
import functools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

METHODS = ("direct", "rag", "agent")


@dataclass
class AgentConfig:
    """The policy and the engine it searches: what evaluation and inference share.

    Attributes:
        model: asset name, HF folder, hub id, or a training run folder (its newest ``checkpoints/step_*/hf``).
        engine: ``bm25``, ``dense``, ``http``, ``serpapi`` or ``simulated`` (see ``conf/search``).
        corpus: the corpus ``bm25``/``dense`` search; empty: ``corpus.jsonl`` of the data folder (the synthetic
            world's by default).
        url: the ``http`` retriever's endpoint.
        top_k: documents per search (and in the RAG prompt); training's ``search.top_k`` default, 5 (the paper).
        max_turns: searches the agent may make (the paper: 2).
        max_tokens_per_turn: generated tokens per turn (the paper: 500).
        max_obs_tokens: tokens of one ``<information>`` block.
        max_model_len, dtype: vLLM settings.
    """

    model: str = "smollm2-135m-instruct"
    engine: str = "bm25"
    corpus: str = ""
    url: str = "http://127.0.0.1:6002/retrieve"
    top_k: int = 5
    max_turns: int = 2
    max_tokens_per_turn: int = 256
    max_obs_tokens: int = 512
    max_model_len: int = 4096
    dtype: str = "bfloat16"


@dataclass
class EvalConfig(AgentConfig):
    """An evaluation run (the policy and engine keys are in ``AgentConfig``).

    Attributes:
        data: ``synthetic`` (the synthetic world's test split, generated when missing) or a data folder.
        benchmarks: names to evaluate (``nq`` … ``bamboogle``, ``synthetic``); empty: every benchmark found in
            ``data`` (a missing one is reported and skipped), or ``synthetic`` for ``data=synthetic``.
        methods: any of ``direct``, ``rag``, ``agent``.
        limit: questions per benchmark, the first ones in file order (the paper: 500).
        engines: vLLM policy engines (Ray actors) the questions are spread over.
        gpus_per_engine: GPUs per engine (0 on CPU).
        out_dir: where the results go; defaults to Hydra's run folder.
        wandb: ``disabled``, ``offline`` or ``online``: a W&B run with the results table.
        timeout_s: bound on each method's whole pass over one benchmark.
        seed: seeds the engines (greedy decoding does not sample; simulated searches do).
    """

    data: str = "synthetic"
    benchmarks: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    limit: int = 500
    engines: int = 1
    gpus_per_engine: float = 0
    out_dir: str = "${hydra:runtime.output_dir}"
    wandb: str = "disabled"
    timeout_s: float = 3600.0
    seed: int = 0


ConfigStore.instance().store(name="evaluate_schema", node=EvalConfig)


def resolve_policy(model: str) -> str:
    """A training run folder's newest HF export, or whatever ``launch.assets.resolve_model`` makes of the name."""
    from launch.assets import resolve_model
    from launch.paths import resolve

    run = resolve(model)
    if (run / "checkpoints").is_dir():
        exports = sorted((int(p.parent.name.split("_")[1]), p) for p in (run / "checkpoints").glob("step_*/hf"))
        if not exports:
            raise FileNotFoundError(f"{run}: a run folder without an HF export (checkpoints/step_*/hf); train with "
                                    f"train.export_hf=true")
        return str(exports[-1][1])
    return resolve_model(model)


def _benchmarks(cfg: EvalConfig) -> tuple[Path, dict[str, list], Path]:
    """The data folder, the questions of each benchmark to run, and the corpus."""
    from actors.evaluation import BENCHMARKS
    from launch.benchmarks import SYNTHETIC, BenchmarkNotFound, benchmark_examples
    from launch.paths import ensure_data, resolve

    if cfg.data == SYNTHETIC:
        from launch.config import DataConfig

        data_dir = ensure_data(DataConfig())["test"].parent
        names = cfg.benchmarks or [SYNTHETIC]
    else:
        data_dir = resolve(cfg.data)
        names = cfg.benchmarks or list(BENCHMARKS)
    found = {}
    for name in names:
        try:
            found[name] = benchmark_examples(data_dir, name, cfg.limit)
        except BenchmarkNotFound as missing:
            if cfg.benchmarks:  # asked for by name: an error
                raise
            print(f"skipped: {missing}", flush=True)
    if not found:
        raise FileNotFoundError(f"no benchmark found under {data_dir}")
    corpus = resolve(cfg.corpus) if cfg.corpus else data_dir / "corpus.jsonl"
    return data_dir, found, corpus


def check_engine(engine: str, corpus: Path, url: str, timeout_s: float = 10.0) -> None:
    """Fail before any actor starts when the engine cannot serve: an unknown name, a local engine without a readable
    corpus, a SerpAPI key not set, or a retriever that does not answer. An engine that fails inside a rollout actor
    answers "No information available" to every search instead, and the whole evaluation would score that."""
    import asyncio

    from simulator.config import SEARCH_ENGINES
    from simulator.corpus import check_corpus
    from simulator.remote import HttpRetriever, SerpApiSearch

    if engine not in SEARCH_ENGINES:
        raise ValueError(f"engine={engine!r}; expected one of {list(SEARCH_ENGINES)}")
    if engine in ("bm25", "dense"):
        check_corpus(corpus)
    elif engine == "serpapi":
        SerpApiSearch()  # raises, naming the variable, when the key is not set
    elif engine == "http":
        result = asyncio.run(HttpRetriever(url, timeout_s=timeout_s, retries=0).search("health check"))
        if result.meta.failed:
            raise ConnectionError(f"the retriever at {url} did not answer ({result.meta.error}); start one with "
                                  f"`python -m launch.serve_retriever`, or set url=")


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    import ray

    from actors.episode import EpisodeConfig
    from actors.evaluation import EvalRecord, flat_rows, markdown_table, summarize
    from actors.group import RolloutGroup
    from actors.rollout import EpisodeRequest, RolloutConfig
    from simulator.config import SearchConfig, SimulatorConfig
    from simulator.simulated import build_search_engine

    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods={unknown}: expected any of {list(METHODS)}")
    policy = resolve_policy(cfg.model)
    _, benchmarks, corpus = _benchmarks(cfg)
    check_engine(cfg.engine, corpus, cfg.url)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False,
             num_cpus=max(2, cfg.engines + 1))
    try:
        search = SearchConfig(engine=cfg.engine, top_k=cfg.top_k, url=cfg.url)
        pool = None
        if cfg.engine == "simulated":
            from launch.assets import resolve_simulator
            from simulator.pool_actor import create_simulator_pool

            pool = create_simulator_pool(resolve_simulator(SimulatorConfig()))
        factory = functools.partial(build_search_engine, search, SimulatorConfig(), pool,
                                    str(corpus) if corpus.is_file() else None)
        rollout_cfg = RolloutConfig(temperature=0.0, episode=EpisodeConfig(
            max_turns=cfg.max_turns, max_tokens_per_turn=cfg.max_tokens_per_turn, max_obs_tokens=cfg.max_obs_tokens))
        engine_kwargs = dict(dtype=cfg.dtype, max_model_len=cfg.max_model_len, enforce_eager=True,
                             gpu_memory_utilization=0.3 if not cfg.gpus_per_engine else 0.85, seed=cfg.seed)
        engines = RolloutGroup(policy, engine_kwargs, factory, rollout_cfg, {"VLLM_CPU_KVCACHE_SPACE": "1"},
                               num_engines=cfg.engines, num_gpus=cfg.gpus_per_engine)
        engines.ready(cfg.timeout_s)

        records: dict[str, list[EvalRecord]] = {m: [] for m in cfg.methods}
        timings: dict[str, float] = {}
        for name, examples in benchmarks.items():
            requests = [EpisodeRequest(e.uid, e.question, e.golden_answers, name, seed=cfg.seed * 1_000_003 + i)
                        for i, e in enumerate(examples)]
            for method in cfg.methods:
                started = time.perf_counter()
                if method == "agent":
                    deadline = started + cfg.timeout_s
                    by_uid = {t.group_id: t for group in engines.stream(requests, 1, 0.0, deadline, temperature=0.0,
                                                                        what=f"agent on {name}")
                              for t in group}
                    found = [EvalRecord.from_trajectory(name, e.question, by_uid[e.uid]) for e in examples]
                else:
                    rows = engines.answer(requests, method == "rag", cfg.top_k, cfg.timeout_s)
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
    header = (f"model `{cfg.model}`, engine `{cfg.engine}` (top {cfg.top_k}), greedy, max_turns {cfg.max_turns}, "
              f"up to {cfg.limit} questions per benchmark\n\n")
    (out / "results.md").write_text(header + tables + "\n")
    (out / "results.json").write_text(json.dumps({"config": asdict(cfg), "results": results, "timings_s": timings},
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
    if cfg.wandb != "disabled":
        import wandb

        run = wandb.init(project="zerosearch-ray-eval", mode=cfg.wandb, dir=str(out), config=asdict(cfg))
        run.log({"results": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
        run.finish()
    print(header + tables, flush=True)
    return results


# Its own folder: the training config's groups (model/, data/) would claim `model=` and `data=` here.
@hydra.main(version_base="1.3", config_path="../conf/eval", config_name="evaluate")
def main(dict_cfg: DictConfig) -> None:
    evaluate(OmegaConf.to_object(dict_cfg))


if __name__ == "__main__":
    main()
