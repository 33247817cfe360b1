"""Ask a policy questions and watch it search: interactively, or over a file of questions.

    python -m launch.infer model=smollm2-135m-instruct engine=bm25         # type questions, read the traces
    python -m launch.infer model=runs/2026-01-01/12-00-00 input=questions.jsonl output=answers.jsonl

Interactive mode reads one question per line from standard input (an empty line or end of input stops) and prints
the trace: ``[think]``, ``[search]``, ``[information]`` (the engine's documents, shortened), ``[ANSWER]``. Batch mode
reads ``input`` (jsonl with a ``question`` field, or plain text, one question per line) and writes one jsonl row per
question to ``output``: the question, the answer, the searches and the whole response. Decoding is greedy.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from launch.evaluate import AgentConfig


@dataclass
class InferConfig(AgentConfig):
    """An inference session (the policy and engine keys are in ``launch.evaluate.AgentConfig``).

    Attributes:
        input: a questions file for batch mode; empty: interactive, from standard input.
        output: where batch mode writes its jsonl (default: ``input`` with ``.answers.jsonl``).
        guided_first_turn_regex: constrain the first turn to this regex (for demos and tests with untrained models).
    """

    input: str = ""
    output: str = ""
    guided_first_turn_regex: str | None = None


ConfigStore.instance().store(name="infer_schema", node=InferConfig)


def _questions(path: Path) -> list[str]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        questions = []
        for number, line in enumerate(lines, 1):
            row = json.loads(line)
            if not isinstance(row.get("question"), str):
                raise ValueError(f"{path}, line {number}: expected a string field 'question'")
            questions.append(row["question"])
        return questions
    return [line.strip() for line in lines]


async def run(cfg: InferConfig) -> None:
    from actors.episode import EpisodeConfig
    from actors.rollout import RolloutConfig, RolloutCore
    from launch.evaluate import resolve_policy
    from launch.paths import resolve
    from simulator.config import SearchConfig
    from simulator.simulated import build_search_engine

    # vLLM's CPU build sizes its KV cache from this (GiB); its default claims a large share of a laptop's memory.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    corpus = resolve(cfg.corpus) if cfg.corpus else None
    if corpus is None and cfg.engine in ("bm25", "dense"):
        from launch.config import DataConfig
        from launch.paths import ensure_data

        corpus = ensure_data(DataConfig())["corpus"]
    search = build_search_engine(SearchConfig(engine=cfg.engine, top_k=cfg.top_k, url=cfg.url), None, None,
                                 str(corpus) if corpus else None)
    episode = EpisodeConfig(max_turns=cfg.max_turns, max_tokens_per_turn=cfg.max_tokens_per_turn,
                            max_obs_tokens=cfg.max_obs_tokens)
    rollout_cfg = RolloutConfig(temperature=0.0, guided_first_turn_regex=cfg.guided_first_turn_regex, episode=episode)
    engine = RolloutCore(resolve_policy(cfg.model), dict(dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                                                          enforce_eager=True, gpu_memory_utilization=0.3),
                          search, rollout_cfg)

    try:
        await _serve(cfg, engine)
    finally:
        # Its engine-core process would otherwise keep the interpreter from exiting; dropping it here, not at exit,
        # keeps vLLM's destructor from running again during interpreter teardown.
        llm, engine.llm = engine.llm, None
        llm.shutdown()
        del llm
        gc.collect()


async def _serve(cfg: InferConfig, engine) -> None:
    from actors.reward import extract_answer
    from actors.rollout import EpisodeRequest
    from actors.trace import render_trace
    from launch.paths import resolve

    async def ask(i: int, question: str):
        return await engine.run(EpisodeRequest(f"q{i}", question, (), "infer", seed=i), noise_prob=0.0,
                                temperature=0.0)

    if cfg.input:
        source = resolve(cfg.input)
        questions = _questions(source)
        trajectories = await asyncio.gather(*(ask(i, q) for i, q in enumerate(questions)))
        output = resolve(cfg.output) if cfg.output else source.with_suffix(".answers.jsonl")
        with open(output, "w") as f:
            for question, t in zip(questions, trajectories):
                f.write(json.dumps({"question": question, "answer": extract_answer(t.response_text),
                                    "searches": t.stats.queries, "response": t.response_text}) + "\n")
        print(f"{len(questions)} answers written to {output}", flush=True)
        return

    print("Ask a question (an empty line quits).", flush=True)
    for i, line in enumerate(sys.stdin):
        question = line.strip()
        if not question:
            break
        trajectory = await ask(i, question)
        print(render_trace(trajectory.response_text), flush=True)
        print(f"-- {trajectory.stats.searches} searches, {trajectory.stats.generated_tokens} tokens generated --\n",
              flush=True)


@hydra.main(version_base="1.3", config_path="../conf/eval", config_name="infer")
def main(dict_cfg: DictConfig) -> None:
    asyncio.run(run(OmegaConf.to_object(dict_cfg)))


if __name__ == "__main__":
    main()
