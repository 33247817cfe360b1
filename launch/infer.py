"""Ask a policy questions and watch it search: interactively, or over a file of questions.

    python -m launch.infer model.name=smollm2-135m-instruct                # type questions, read the traces
    python -m launch.infer model.name=runs/2026-01-01/12-00-00 infer.input=questions.jsonl infer.output=answers.jsonl

Interactive mode reads one question per line from standard input (an empty line or end of input stops) and prints
the trace: ``[think]``, ``[search]``, ``[information]`` (the engine's documents, shortened), ``[ANSWER]``. Batch mode
reads ``infer.input`` (jsonl with a ``question`` field, or plain text, one question per line) and writes one jsonl
row per question to ``infer.output``: the question, the answer, the searches and the whole response. Decoding is
greedy. The config is training's, with real BM25 as the engine (``conf/infer.yaml``): ``model.*``, ``search=...``,
``search.*``, ``rollout.*`` (the episode limits, ``rollout.guided_first_turn_regex``) mean what they mean for
training. The engine runs in this process, without Ray, so the simulated engine (a Ray pool) is not offered here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from launch.config import Config, register_configs

register_configs()


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


async def run(cfg: Config) -> None:
    from actors.rollout import RolloutCore
    from launch.assets import resolve_policy
    from launch.driver.cluster import policy_engine_options
    from launch.paths import ensure_data, resolve
    from simulator.simulated import build_search_engine

    if cfg.search.engine == "simulated":
        raise ValueError("search.engine=simulated: launch.infer runs its engine without Ray, and the simulator is a "
                         "Ray pool; choose a real engine (search=bm25, dense, http or serpapi)")
    engine_kwargs, env = policy_engine_options(cfg)
    for key, value in env.items():  # read by vLLM's CPU build when the engine process starts
        os.environ.setdefault(key, value)
    corpus = resolve(cfg.search.corpus_file) if cfg.search.corpus_file else None
    if corpus is None and cfg.search.engine in ("bm25", "dense"):
        corpus = ensure_data(cfg.data)["corpus"]
    search = build_search_engine(cfg.search, None, None, str(corpus) if corpus else None)
    engine = RolloutCore(resolve_policy(cfg.model.name), engine_kwargs, search,
                         dataclasses.replace(cfg.rollout, temperature=0.0))

    try:
        await _serve(cfg, engine)
    finally:
        # Its engine-core process would otherwise keep the interpreter from exiting; dropping it here, not at exit,
        # keeps vLLM's destructor from running again during interpreter teardown.
        llm, engine.llm = engine.llm, None
        llm.shutdown()
        del llm
        gc.collect()


async def _serve(cfg: Config, engine) -> None:
    from actors.reward import extract_answer
    from actors.rollout import EpisodeRequest
    from actors.trace import render_trace
    from launch.paths import resolve

    async def ask(i: int, question: str):
        return await engine.run(EpisodeRequest(f"q{i}", question, (), "infer", seed=i), noise_prob=0.0,
                                temperature=0.0)

    if cfg.infer.input:
        source = resolve(cfg.infer.input)
        questions = _questions(source)
        trajectories = await asyncio.gather(*(ask(i, q) for i, q in enumerate(questions)))
        output = resolve(cfg.infer.output) if cfg.infer.output else source.with_suffix(".answers.jsonl")
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


@hydra.main(version_base="1.3", config_path="../conf", config_name="infer")
def main(dict_cfg: DictConfig) -> None:
    asyncio.run(run(OmegaConf.to_object(dict_cfg)))


if __name__ == "__main__":
    main()
