"""How often the simulator's useful documents contain the gold answer, against its noisy ones.

    python bench/simulator_quality.py [--questions 100] [--max-tokens 256] [--model smollm2-135m-instruct]

The curriculum only means something if "useful" results help more than "noisy" ones. For each test question of a
synthetic world, the question itself is the query; `SimulatedSearch` over the real pool is called once with noise
probability 0 (useful) and once with 1 (noisy). An answer "appears" when the normalized gold answer
(`actors.reward.normalize_answer`) occurs as a whole-word span in the normalized documents. Reported per kind: the
rate over replies and over single documents, documents per reply, failed searches; and the useful - noisy gap.

The one-search shortcut: the useful prompt carries the gold answer, so on a two-hop question the simulator may write
the final answer into the results of the first search (the question as the query), which real BM25 over the same
corpus almost never does. ``two_hop`` gives the answer-in-reply rate of useful, noisy and BM25 results on the two-hop
questions alone, and what the curriculum's mix gives at noise probability p (``(1-p) useful + p noisy``).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulator.base import SearchContext  # noqa: E402
from simulator.config import SimulatorConfig  # noqa: E402
from simulator.tuning_data import contains_answer  # noqa: E402


def load_questions(n: int, seed: int, folder: str) -> tuple[list[dict], Path]:
    """The first ``n`` test and validation questions of a synthetic world written to ``folder``, and its corpus."""
    import pyarrow.parquet as pq

    from launch.synthetic_world import write_world

    paths = write_world(folder, seed=seed, entities=200)
    rows = pq.read_table(paths["test"]).to_pylist() + pq.read_table(paths["val"]).to_pylist()
    if len(rows) < n:
        raise SystemExit(f"the synthetic world has only {len(rows)} test/val questions; ask for fewer")
    return rows[:n], paths["corpus"]


def two_hop_shortcut(rows, useful, noisy, real, noise_probs=(0.0, 0.25, 0.5)) -> dict[str, float]:
    """Answer-in-reply rates on the two-hop questions: the simulator's useful and noisy results, BM25's, and the
    curriculum's mix at each noise probability."""
    two = [i for i, r in enumerate(rows) if r["extra_info"]["hops"] == 2]

    def rate(results) -> float:
        return sum(contains_answer(results[i].text, rows[i]["golden_answers"]) for i in two) / max(1, len(two))

    out = {"questions": len(two), "useful": round(rate(useful), 3), "noisy": round(rate(noisy), 3),
           "bm25": round(rate(real), 3)}
    for p in noise_probs:
        out[f"mix_at_noise_{p}"] = round((1 - p) * out["useful"] + p * out["noisy"], 3)
    return out


def summarize(results, answers: list[list[str]]) -> dict[str, float]:
    replies = sum(contains_answer(r.text, a) for r, a in zip(results, answers) if not r.meta.failed)
    docs = [(d, a) for r, a in zip(results, answers) for d in r.documents]
    return {
        "answer_in_reply_rate": round(replies / len(results), 3),
        "answer_in_document_rate": round(sum(contains_answer(d, a) for d, a in docs) / max(1, len(docs)), 3),
        "documents_per_reply": round(len(docs) / len(results), 2),
        "failed_searches": sum(r.meta.failed for r in results),
        "mean_tokens": round(sum(r.meta.num_tokens for r in results) / len(results), 1),
    }


async def run_searches(engine, rows, noise_prob: float):
    ctxs = [SearchContext(question=r["question"], golden_answers=tuple(r["golden_answers"]), noise_prob=noise_prob,
                          seed=i) for i, r in enumerate(rows)]
    return await asyncio.gather(*(engine.search(r["question"], c) for r, c in zip(rows, ctxs)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--mode", default="prompt", choices=("prompt", "sft"),
                        help="sft for a tuned simulator (make simulator's runs/simulation/tuned/hf)")
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ray

    from launch.assets import resolve_simulator
    from simulator.engines import BM25Search
    from simulator.pool_actor import create_simulator_pool
    from simulator.simulated import SimulatedSearch

    world = tempfile.TemporaryDirectory()
    rows, corpus = load_questions(args.questions, args.seed, world.name)
    real = asyncio.run(run_searches(BM25Search(corpus, top_k=5), rows, noise_prob=0.0))
    cfg = SimulatorConfig(model=args.model, mode=args.mode, num_servers=args.servers, max_tokens=args.max_tokens,
                          request_timeout_s=900.0, health_check_interval_s=0.0, seed=args.seed)
    ray.init(address="local", num_cpus=max(2, args.servers), include_dashboard=False, log_to_driver=False)
    try:
        pool = create_simulator_pool(resolve_simulator(cfg))
        engine = SimulatedSearch(pool, mode=args.mode, timeout_s=3600.0)
        start = time.perf_counter()
        useful = asyncio.run(run_searches(engine, rows, noise_prob=0.0))
        noisy = asyncio.run(run_searches(engine, rows, noise_prob=1.0))
        elapsed = time.perf_counter() - start
        stats = ray.get(pool.stats.remote(), timeout=60)
    finally:
        ray.shutdown()
    answers = [r["golden_answers"] for r in rows]
    assert all(r.meta.noisy is False for r in useful) and all(r.meta.noisy is True for r in noisy)
    result = {
        "model": args.model, "mode": args.mode, "questions": len(rows), "max_tokens": args.max_tokens,
        "useful": summarize(useful, answers), "noisy": summarize(noisy, answers),
        "two_hop": two_hop_shortcut(rows, useful, noisy, real),
        "seconds": round(elapsed, 1), "pool_failures": stats["failures"],
        "example_useful": {"question": rows[0]["question"], "answer": rows[0]["golden_answers"][0],
                           "text": useful[0].text[:600]},
        "example_noisy": {"text": noisy[0].text[:600]},
    }
    result["gap_reply_rate"] = round(result["useful"]["answer_in_reply_rate"] - result["noisy"]["answer_in_reply_rate"],
                                     3)
    world.cleanup()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
