"""Measure simulators against the real engine on held-out queries: the last step of simulation tuning.

    python -m launch.simulator_report
    python -m launch.simulator_report simulation.dir=runs/simulation simulation.report.queries=200
    python -m launch.simulator_report simulation.report.tuned=runs/simulation/tuned/hf simulator=tiny

The queries are the held-out split of the records written by ``launch.collect_sim_data``
(``{simulation.dir}/data/records.jsonl``, rows with ``split == "val"``), the first ``simulation.report.queries``
distinct (question, query) pairs. Three sources answer each of them:

    base   the run's simulator (``simulator.model`` in ``simulator.mode``), once useful and once noisy
    tuned  the fine-tuned simulator (``simulation.report.tuned``, else ``{dir}/tuned/hf``) in ``sft`` mode, likewise;
           skipped when there is none
    real   the real engine the data was collected with (``simulation.collect.engine``), once per query; it has no
           useful/noisy switch, so its queries are also split by the label the held-out row carries

Per source and kind: how often a gold answer is in the reply and in a single document, how often exactly top_k
documents were parsed, documents per reply, words per document, failed searches, latency and generated tokens/s.
A good simulator has a large gap between its useful and noisy answer rates, and useful documents about as
informative as the real engine's. Written to ``{simulation.dir}/report.json`` and ``report.md``; the table is printed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from launch.config import Config, register_configs
from simulator.base import SearchContext, SearchResult
from simulator.tuning_data import NOISY, USEFUL, contains_answer, read_records

register_configs()

SIMULATOR_KINDS = (USEFUL, NOISY)
REAL_KINDS = ("all", "useful_labelled", "noisy_labelled")
METRICS = ("answer_in_reply", "answer_in_document", "format_valid", "documents_per_reply", "words_per_document",
           "failed", "latency_s_mean", "latency_s_p50", "tokens_per_s")
EXAMPLE_CHARS = 1000


def load_queries(path: Path, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` distinct (question, query) pairs of the held-out split of the collected records, in file
    order: every labelled held-out search, not only the balanced subset that became SFT data. A pair that appears
    with both labels (v1 keeps both when one episode was right and one wrong) keeps its first row's label."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no held-out queries; run `python -m launch.collect_sim_data` first "
                                f"(with the same simulation.dir)")
    unique: dict[tuple[str, str], dict[str, Any]] = {}
    for r in read_records(path):
        if r.split == "val" and r.label in SIMULATOR_KINDS:
            unique.setdefault((r.question, r.query), {"question": r.question, "query": r.query, "label": r.label,
                                                      "golden_answers": list(r.golden_answers)})
    rows = list(unique.values())
    if len(rows) < limit:
        print(f"note: {path} holds {len(rows)} distinct held-out queries, fewer than the {limit} asked for; "
              f"using all of them", flush=True)
    return rows[:limit]


def reply_metrics(results: Sequence[SearchResult], answers: Sequence[Sequence[str]], top_k: int,
                  seconds: float | None = None) -> dict[str, Any]:
    """The report's numbers for one pass: ``results[i]`` answered a query whose gold answers are ``answers[i]``.

    Shares are over all replies (a failed search counts as a reply without the answer), document figures over all
    documents. ``tokens_per_s`` needs the pass's wall-clock ``seconds``; None for real engines, which generate none.
    Figures with nothing to average over are None.
    """

    def mean(values: Sequence[float]) -> float | None:
        return round(statistics.fmean(values), 4) if values else None

    documents = [(doc, gold) for r, gold in zip(results, answers) for doc in r.documents]
    latencies = [r.meta.latency_s for r in results]
    tokens = sum(r.meta.num_tokens for r in results)
    return {
        "n": len(results),
        # The joined documents, not ``text``: a failed search's text is the fallback message, never an answer.
        "answer_in_reply": mean([contains_answer(" ".join(r.documents), gold) for r, gold in zip(results, answers)]),
        "answer_in_document": mean([contains_answer(doc, gold) for doc, gold in documents]),
        "format_valid": mean([len(r.documents) == top_k for r in results]),
        "documents_per_reply": mean([len(r.documents) for r in results]),
        "words_per_document": mean([len(doc.split()) for doc, _ in documents]),
        "failed": sum(r.meta.failed for r in results),
        "latency_s_mean": mean(latencies),
        "latency_s_p50": round(statistics.median(latencies), 4) if latencies else None,
        "tokens_per_s": round(tokens / seconds, 2) if seconds else None,
        "seconds": round(seconds, 2) if seconds is not None else None,
    }


def answer_gap(metrics: dict[str, dict[str, Any]], high: str, low: str) -> float | None:
    a, b = metrics[high]["answer_in_reply"], metrics[low]["answer_in_reply"]
    return None if a is None or b is None else round(a - b, 4)


def example(row: dict[str, Any], result: SearchResult) -> dict[str, Any]:
    return {"question": row["question"], "golden_answers": row["golden_answers"], "query": row["query"],
            "label": row["label"], "failed": result.meta.failed, "text": result.text[:EXAMPLE_CHARS]}


def first_example(rows: list[dict[str, Any]], results: list[SearchResult]) -> dict[str, Any] | None:
    """The first reply that did not fail (else the first reply): an example worth reading."""
    pairs = list(zip(rows, results))
    chosen = next(((row, r) for row, r in pairs if not r.meta.failed), pairs[0] if pairs else None)
    return example(*chosen) if chosen else None


def _cell(metric: str, value: Any) -> str:
    if value is None:
        return "–"
    if metric in ("n", "failed"):
        return str(value)
    return f"{value:.1f}" if metric in ("words_per_document", "tokens_per_s") else f"{value:.3f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: one row per source and kind, then a line per source on its useful/noisy gap."""
    columns = ("n", *METRICS)
    lines = [f"# Simulator report\n\n{report['queries']} held-out queries from `{report['file']}`, top_k "
             f"{report['top_k']}; simulators sample at temperature {report['temperature']} with up to "
             f"{report['max_tokens']} new tokens.\n",
             "| source | kind | " + " | ".join(columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    for name, source in report["sources"].items():
        for kind, metrics in source["metrics"].items():
            lines.append(f"| {name} | {kind} | " + " | ".join(_cell(m, metrics.get(m)) for m in columns) + " |")
    lines.append("")
    real_rate = report["sources"].get("real", {}).get("metrics", {}).get("all", {}).get("answer_in_reply")
    for name, source in report["sources"].items():
        what = f"`{source['model']}`, {source['mode']} mode" if "model" in source else f"`{source['engine']}`"
        if name == "real":
            line = f"- **{name}** ({what}): answer-in-reply gap, useful-labelled − noisy-labelled queries: "
        else:
            line = f"- **{name}** ({what}): answer-in-reply gap, useful − noisy: "
        line += _cell("gap", source["gap"])
        useful_rate = source["metrics"].get(USEFUL, {}).get("answer_in_reply")
        if useful_rate is not None and real_rate is not None:
            line += f"; useful {useful_rate:.3f} against the real engine's {real_rate:.3f}"
        lines.append(line)
    lines += [f"- **{name}**: skipped ({why})" for name, why in report.get("skipped", {}).items()]
    return "\n".join(lines) + "\n"


def model_location(name: str) -> str:
    """An asset name or hub id as ``resolve_model`` takes it; a folder taken from the repository root, as config
    paths are, so that a relative path means the same inside the server actors."""
    from launch.assets import MODEL_NAMES, resolve_model
    from launch.paths import resolve

    local = resolve(name)
    return str(local) if name not in MODEL_NAMES and local.exists() else resolve_model(name)


def tuned_model(cfg: Config) -> str | None:
    """``simulation.report.tuned``, else ``{dir}/tuned/hf`` when ``launch.tune_simulator`` has written it."""
    from launch.paths import resolve

    if cfg.simulation.report.tuned:
        return model_location(cfg.simulation.report.tuned)
    default = resolve(cfg.simulation.dir) / "tuned" / "hf"
    return str(default) if default.is_dir() else None


async def _search_all(engine, rows: list[dict[str, Any]], noise_prob: float, top_k: int) -> list[SearchResult]:
    """Every query at once: the simulator's vLLM server batches them, as it does under training."""
    contexts = [SearchContext(question=row["question"], golden_answers=tuple(row["golden_answers"]),
                              noise_prob=noise_prob, seed=i, top_k=top_k) for i, row in enumerate(rows)]
    return list(await asyncio.gather(*(engine.search(row["query"], ctx) for row, ctx in zip(rows, contexts))))


def measure_simulator(cfg: Config, model: str, mode: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One pool of ``model`` in ``mode``: a useful pass, then a noisy pass over every query; the pool is shut down
    before returning, so that the next simulator gets the machine to itself. Ray must be running."""
    import ray

    from launch.assets import resolve_simulator
    from simulator.pool_actor import create_simulator_pool
    from simulator.simulated import SimulatedSearch

    report, top_k = cfg.simulation.report, cfg.search.top_k
    # Every request enters vLLM at once, so one attempt waits for the whole pass: a shorter per-attempt limit would
    # abandon and resend requests that are merely queued. Background health checks would only disturb the timings.
    sim_cfg = dataclasses.replace(cfg.simulator, model=model, mode=mode, max_tokens=report.max_tokens,
                                  temperature=report.temperature, cache_size=0,
                                  request_timeout_s=report.timeout_s, health_check_interval_s=0.0)
    print(f"simulator {model} ({mode} mode): starting", flush=True)
    pool = create_simulator_pool(resolve_simulator(sim_cfg))
    try:
        engine = SimulatedSearch(pool, mode=mode, top_k=top_k, timeout_s=report.timeout_s)
        answers = [row["golden_answers"] for row in rows]
        metrics, examples = {}, {}
        for kind, noise_prob in ((USEFUL, 0.0), (NOISY, 1.0)):
            started = time.perf_counter()
            results = asyncio.run(_search_all(engine, rows, noise_prob, top_k))
            metrics[kind] = reply_metrics(results, answers, top_k, time.perf_counter() - started)
            examples[kind] = first_example(rows, results)
            print(f"simulator {model}: {kind} pass in {metrics[kind]['seconds']:.1f}s", flush=True)
    finally:
        try:
            ray.get(pool.shutdown.remote(), timeout=60)  # kills its server actors
        finally:
            ray.kill(pool, no_restart=True)
    return {"model": model, "mode": mode, "metrics": metrics, "gap": answer_gap(metrics, USEFUL, NOISY),
            "examples": examples}


def measure_real_engine(cfg: Config, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The real engine once per query; figures over all queries and over each held-out label. Also returns the
    engine's config, for the report."""
    from launch.paths import ensure_data
    from simulator.simulated import build_search_engine

    name, top_k = cfg.simulation.collect.engine, cfg.search.top_k
    search_cfg = dataclasses.replace(cfg.search, engine=name)
    corpus = None
    if name in ("bm25", "dense") and not search_cfg.corpus_file:  # the corpus the data was collected over
        corpus = str(ensure_data(cfg.data)["corpus"])
    engine = build_search_engine(search_cfg, cfg.simulator, None, corpus)

    async def run() -> list[SearchResult]:
        try:
            return await asyncio.wait_for(_search_all(engine, rows, 0.0, top_k), cfg.simulation.report.timeout_s)
        finally:
            await engine.close()

    started = time.perf_counter()
    results = asyncio.run(run())
    seconds = time.perf_counter() - started
    print(f"real engine {name}: {len(rows)} searches in {seconds:.1f}s", flush=True)
    groups = {"all": list(range(len(rows))),
              "useful_labelled": [i for i, row in enumerate(rows) if row["label"] == USEFUL],
              "noisy_labelled": [i for i, row in enumerate(rows) if row["label"] == NOISY]}
    metrics, examples = {}, {}
    for kind, picked in groups.items():
        metrics[kind] = reply_metrics([results[i] for i in picked], [rows[i]["golden_answers"] for i in picked], top_k)
        if kind != "all":
            examples[kind] = first_example([rows[i] for i in picked], [results[i] for i in picked])
    metrics["all"]["seconds"] = round(seconds, 2)
    source = {"engine": name, "metrics": metrics, "gap": answer_gap(metrics, "useful_labelled", "noisy_labelled"),
              "examples": examples}
    return source, dataclasses.asdict(search_cfg)


def run_report(cfg: Config) -> dict[str, Any]:
    """Measure every source, write ``report.json`` and ``report.md`` into ``simulation.dir``, return the report.
    Ray must be running (the simulators are Ray actors)."""
    from launch.paths import resolve

    out = resolve(cfg.simulation.dir)
    path = out / "data" / "records.jsonl"
    rows = load_queries(path, cfg.simulation.report.queries)
    real, real_cfg = measure_real_engine(cfg, rows)  # first: cheap, and it fails fast on a missing corpus
    sources = {"base": measure_simulator(cfg, model_location(cfg.simulator.model), cfg.simulator.mode, rows)}
    skipped = {}
    tuned = tuned_model(cfg)
    if tuned is None:
        skipped["tuned"] = (f"no tuned simulator: set simulation.report.tuned, or run `python -m "
                            f"launch.tune_simulator` to write {out / 'tuned' / 'hf'}")
        print(f"tuned: skipped ({skipped['tuned']})", flush=True)
    else:
        sources["tuned"] = measure_simulator(cfg, tuned, "sft", rows)
    sources["real"] = real

    r = cfg.simulation.report
    report = {"file": str(path), "queries": len(rows), "top_k": cfg.search.top_k,
              "max_tokens": r.max_tokens, "temperature": r.temperature, "sources": sources, "skipped": skipped,
              "config": {"simulation": dataclasses.asdict(cfg.simulation),
                         "simulator": dataclasses.asdict(cfg.simulator), "real_engine": real_cfg}}
    markdown = render_markdown(report)
    write_atomic(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_atomic(out / "report.md", markdown)
    print(markdown, flush=True)
    print(f"written: {out / 'report.md'} and {out / 'report.json'}", flush=True)
    return report


def write_atomic(path: Path, text: str) -> None:
    """Whole or not at all: written beside the target, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(dict_cfg: DictConfig) -> None:
    import ray

    from launch.driver.cluster import init_ray

    cfg: Config = OmegaConf.to_object(dict_cfg)
    init_ray(cfg)
    try:
        run_report(cfg)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
