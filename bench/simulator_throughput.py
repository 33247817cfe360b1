"""Throughput of the simulator pool against raw vLLM on the same prompts, measured in one run.

    python bench/simulator_throughput.py [--prompts 32] [--max-tokens 192] [--rounds 2] [--model ...]

Three phases, each on the same simulator prompts (prompt mode, questions of the synthetic world) and the same
sampling (temperature 0.8, exactly max_tokens new tokens per request via ignore_eos, so every phase does the same
work; documents are still parsed from the text, which is cut at "Doc 6"):
- raw: one vLLM `LLM.generate` call over all prompts inside a Ray actor, the best batched case with no routing;
- pool x1 and pool x2: every prompt sent as its own concurrent call through `SimulatorPoolActor` with 1 and 2 servers
  (what rollout actors do).
Reported: documents/s (parsed by `parse_simulator_output`), generated tokens/s, the pool's latency percentiles, and
`overhead_ratio = raw tokens/s / pool x1 tokens/s` (1.0 means the pool costs nothing). Each phase is timed
``--rounds`` times after a warm-up and the best round is used, which is the one least disturbed by other processes
on a shared machine. Prints one JSON object. Compare numbers only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulator.config import SimulatorConfig  # noqa: E402
from simulator.templates import build_simulator_prompt, parse_simulator_output  # noqa: E402


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """Useful and noisy prompts (alternating) for questions of a small synthetic world, the query being the question."""
    import pyarrow.parquet as pq

    from launch.synthetic_world import write_world

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_world(tmp, seed=seed, entities=64)
        rows = pq.read_table(paths["train"]).to_pylist()
    prompts = []
    for i in range(n):
        row = rows[i % len(rows)]
        prompts.append(build_simulator_prompt(row["question"], row["question"], row["golden_answers"][0],
                                              useful=i % 2 == 0, mode="prompt"))
    return prompts


class RawEngine:
    """Plain vLLM in a Ray actor, with the same engine options, chat formatting and CPU binding as a pool server."""

    def __init__(self, cfg: SimulatorConfig) -> None:
        from transformers import AutoTokenizer
        from vllm import LLM

        from launch.assets import resolve_model
        from simulator.server import cpu_engine_env, engine_kwargs

        os.environ.update(cpu_engine_env(cfg, 0))
        path = resolve_model(cfg.model)
        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        kwargs = engine_kwargs(cfg, path)
        kwargs.pop("disable_log_stats")
        self.llm = LLM(**kwargs)

    def generate(self, prompts: list[str], sampling: dict) -> tuple[list[str], int, float]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from simulator.server import chat_prompt_ids, sampling_kwargs

        inputs = [TokensPrompt(prompt_token_ids=chat_prompt_ids(self.tokenizer, p)) for p in prompts]
        start = time.perf_counter()
        outputs = self.llm.generate(inputs, SamplingParams(**sampling_kwargs(self.cfg, sampling)), use_tqdm=False)
        elapsed = time.perf_counter() - start
        return [o.outputs[0].text for o in outputs], sum(len(o.outputs[0].token_ids) for o in outputs), elapsed


SAMPLING = {"ignore_eos": True}


def _summary(rounds: list[tuple[list[str], int, float]]) -> dict[str, object]:
    """The best round's numbers, plus every round's tokens/s."""
    rates = [tokens / elapsed for _, tokens, elapsed in rounds]
    texts, tokens, elapsed = rounds[rates.index(max(rates))]
    docs = sum(len(parse_simulator_output(t, 5)) for t in texts)
    return {"seconds": round(elapsed, 2), "documents": docs, "tokens": tokens,
            "documents_per_s": round(docs / elapsed, 2), "tokens_per_s": round(tokens / elapsed, 1),
            "tokens_per_s_each_round": [round(r, 1) for r in rates]}


def bench_raw(ray, cfg: SimulatorConfig, prompts: list[str], rounds: int) -> dict[str, object]:
    actor = ray.remote(RawEngine).options(num_cpus=cfg.cpus_per_server).remote(cfg)
    try:
        ray.get(actor.generate.remote(prompts[:4], SAMPLING), timeout=cfg.startup_timeout_s)  # load and warm up
        return _summary([ray.get(actor.generate.remote(prompts, SAMPLING), timeout=3600) for _ in range(rounds)])
    finally:
        ray.kill(actor)


def bench_pool(ray, cfg: SimulatorConfig, prompts: list[str], rounds: int) -> dict[str, object]:
    from launch.assets import resolve_simulator
    from simulator.pool_actor import create_simulator_pool

    pool = create_simulator_pool(resolve_simulator(cfg))
    try:
        ray.get([pool.generate.remote(p, None, SAMPLING) for p in prompts[:4]], timeout=3600)  # warm up
        before = ray.get(pool.stats.remote(), timeout=60)
        measured = []
        for _ in range(rounds):
            start = time.perf_counter()
            replies = ray.get([pool.generate.remote(p, None, SAMPLING) for p in prompts], timeout=3600)
            elapsed = time.perf_counter() - start
            measured.append(([r["text"] for r in replies], sum(r["num_tokens"] for r in replies), elapsed))
        stats = ray.get(pool.stats.remote(), timeout=60)
        result = _summary(measured)
        result.update(failures=stats["failures"] - before["failures"], latency_p50_s=round(stats["latency_p50_s"], 2),
                      latency_p95_s=round(stats["latency_p95_s"], 2),
                      calls_per_server=[s["calls"] for s in stats["servers"]])
        return result
    finally:
        ray.get(pool.shutdown.remote(), timeout=60)
        ray.kill(pool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()

    import ray

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    prompts = make_prompts(args.prompts)
    common = {"model": args.model, "max_tokens": args.max_tokens, "max_model_len": 2048, "request_timeout_s": 600.0,
              "health_check_interval_s": 0.0, "cpus_per_server": 1.0}
    results: dict[str, object] = {"model": args.model, "prompts": len(prompts), "max_tokens": args.max_tokens,
                                  "rounds": args.rounds, "cpus": os.cpu_count()}
    try:
        results["raw_vllm"] = bench_raw(ray, SimulatorConfig(**common, num_servers=1), prompts, args.rounds)
        results["pool_1_server"] = bench_pool(ray, SimulatorConfig(**common, num_servers=1), prompts, args.rounds)
        results["pool_2_servers"] = bench_pool(ray, SimulatorConfig(**common, num_servers=2), prompts, args.rounds)
    finally:
        ray.shutdown()
    raw, one, two = results["raw_vllm"], results["pool_1_server"], results["pool_2_servers"]
    results["overhead_ratio"] = round(raw["tokens_per_s"] / one["tokens_per_s"], 3)
    results["speedup_2_vs_1_servers"] = round(two["tokens_per_s"] / one["tokens_per_s"], 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
