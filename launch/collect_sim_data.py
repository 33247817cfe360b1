"""Collect real search results and write the simulator's fine-tuning data (spec section 3).

    python -m launch.collect_sim_data                                   # SmolLM2 (warmed up) and BM25, label v1
    python -m launch.collect_sim_data simulation.collect.label=rule simulation.collect.questions=2000
    python -m launch.collect_sim_data model.name=runs/2026-01-01/12-00-00/checkpoints/step_200/hf \\
        simulation.collect.engine=http search.url=http://10.0.0.2:6002/retrieve simulation.collect.engines=8

It takes the training config, so ``model``, ``data``, ``search`` and ``cluster`` mean what they mean for training:

    1. the policy (``model.name``; warmed up first when ``train.warmup`` says so, from the same cache as training)
       answers ``simulation.collect.questions`` training questions, ``samples_per_question`` episodes each, with the
       search protocol against a real engine, on ``simulation.collect.engines`` vLLM Ray actors;
    2. every search becomes a record: question, gold answers, query, the real documents, the episode's final answer
       and whether it was correct;
    3. each record is labelled useful or noisy (``simulation.collect.label``: ``v1``, ``rule`` or ``llm``);
    4. duplicates are dropped, questions are split by a hash, and each split is balanced.

Written to ``{simulation.dir}/data/``: ``records.jsonl`` (every record, its label and split), ``sft_train.jsonl`` and
``sft_val.jsonl`` (``{"prompt", "completion", ...}``: the SFT-mode prompt, the documents as ``Doc i:`` lines) and
``summary.json``. Next: ``python -m launch.tune_simulator``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import random
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from launch.config import Config, register_configs
from simulator import tuning_data as sim_data
from simulator.tuning_data import NOISY, USEFUL, SearchRecord

register_configs()

REAL_ENGINES = ("bm25", "dense", "http", "serpapi")
QUESTIONS_PER_ROUND = 96  # per engine


def final_answer(trajectory) -> tuple[str | None, bool]:
    """The episode's answer, and whether it is correct by the paper's "EM" (a gold answer is a substring)."""
    from actors.reward import extract_answer, substring_match

    answer = extract_answer(trajectory.response_text)
    return answer, answer is not None and substring_match(answer, trajectory.golden_answers) > 0


def records_of(trajectory, question_id: str, question: str, sample: int, engine: str,
               answer: tuple[str | None, bool] | None = None) -> list[SearchRecord]:
    """One record per search the episode made, all carrying the episode's final answer and its correctness
    (``final_answer(trajectory)``, computed here unless the caller has it)."""
    answer, correct = answer or final_answer(trajectory)
    stats = trajectory.stats
    return [SearchRecord(question=question, golden_answers=list(trajectory.golden_answers), query=query,
                         documents=list(documents), final_answer=answer, correct=bool(correct),
                         question_id=question_id, sample=sample, turn=turn, engine=engine)
            for turn, (query, documents) in enumerate(zip(stats.queries, stats.documents))]


def collect(cfg: Config, policy_path: str, train_file: Path, corpus_file: Path) -> tuple[list[SearchRecord], dict]:
    """Run the policy on training questions against the real engine, spread over Ray actors; every search's record."""

    from actors.dataset import load_qa
    from actors.group import RolloutGroup
    from actors.rollout import EpisodeRequest
    from launch.driver.cluster import policy_engine_options
    from simulator.simulated import build_search_engine

    c = cfg.simulation.collect
    examples = load_qa(train_file)
    random.Random(cfg.seed).shuffle(examples)
    examples = examples[:c.questions]
    search = dataclasses.replace(cfg.search, engine=c.engine)
    factory = functools.partial(build_search_engine, search, cfg.simulator, None, str(corpus_file))
    rollout_cfg = cfg.rollout
    engine_kwargs, env = policy_engine_options(cfg)  # prefix caching on (rollout.enable_prefix_caching)
    engines = RolloutGroup(policy_path, engine_kwargs, factory, rollout_cfg, env, num_engines=c.engines,
                           num_gpus=cfg.cluster.rollout_gpus)
    engines.ready(cfg.cluster.actor_start_timeout_s)

    started = time.perf_counter()
    requests = [EpisodeRequest(e.uid, e.question, e.golden_answers, e.data_source, seed=cfg.seed * 1_000_003 + i)
                for i, e in enumerate(examples)]
    by_uid = {e.uid: e for e in examples}
    records, episodes, correct = [], 0, 0
    deadline = time.perf_counter() + c.timeout_s
    # In rounds of a few dozen questions per engine: a generation queued behind thousands would hit its timeout.
    step = QUESTIONS_PER_ROUND * len(engines)
    for start in range(0, len(requests), step):
        chunk = requests[start:start + step]
        for group in engines.stream(chunk, c.samples_per_question, 0.0, deadline, temperature=c.temperature,
                                    what=f"collection (simulation.collect.timeout_s={c.timeout_s})"):
            for sample, trajectory in enumerate(group):
                example = by_uid[trajectory.group_id]
                outcome = final_answer(trajectory)
                records += records_of(trajectory, example.uid, example.question, sample, c.engine, outcome)
                episodes += 1
                correct += outcome[1]
        print(f"collect: {min(start + step, len(requests))}/{len(requests)} questions, {len(records)} searches",
              flush=True)
    engines.kill()
    seconds = time.perf_counter() - started
    return records, {"questions": len(examples), "episodes": episodes, "correct_episodes": correct,
                     "searches": len(records), "seconds": round(seconds, 1)}


def judge(cfg: Config, records: list[SearchRecord]) -> list[str | None]:
    """v2 with an LLM judge: one greedy yes/no per record, served by a simulator pool of ``judge_model``."""
    import ray

    from launch.assets import resolve_simulator
    from simulator.pool_actor import create_simulator_pool

    c = cfg.simulation.collect
    judge_cfg = dataclasses.replace(cfg.simulator, model=c.judge_model or cfg.simulator.model, temperature=0.0,
                                    max_tokens=4, cache_size=0)
    pool = create_simulator_pool(resolve_simulator(judge_cfg))

    async def ask_all() -> list[dict[str, Any]]:
        calls = [pool.generate.remote(sim_data.judge_prompt(r), None) for r in records]
        return list(await asyncio.wait_for(asyncio.gather(*calls), c.timeout_s))

    try:
        replies = asyncio.run(ask_all())
    finally:
        ray.get(pool.shutdown.remote(), timeout=120)
        ray.kill(pool)
    return [None if reply.get("failed") else sim_data.parse_judgement(reply.get("text")) for reply in replies]


def label_all(cfg: Config, records: list[SearchRecord]) -> dict[str, Any]:
    """Sets each record's label by the configured rule; records the judge could not label are left unlabelled.
    The agreement of v1 with the rule is reported whatever the rule, as a measure of how noisy v1's labels are."""
    rule = cfg.simulation.collect.label
    if rule not in sim_data.LABEL_RULES:
        raise ValueError(f"simulation.collect.label={rule!r}; expected one of {list(sim_data.LABEL_RULES)}")
    if rule == "llm":
        labels = judge(cfg, records)
    else:
        labels = [(sim_data.label_v1 if rule == "v1" else sim_data.label_rule)(r) for r in records]
    for record, label in zip(records, labels):
        record.label = label or ""
    agree = sum(sim_data.label_v1(r) == sim_data.label_rule(r) for r in records)
    return {"rule": rule, "unlabelled": sum(not r.label for r in records),
            "v1_rule_agreement": round(agree / max(1, len(records)), 3)}


def build_dataset(cfg: Config, records: list[SearchRecord]) -> tuple[list[SearchRecord], dict[str, Any]]:
    """Usable, labelled, deduplicated records with their split; the balanced subset that becomes SFT data."""
    c = cfg.simulation.collect
    kept = sim_data.dedupe(r for r in records if sim_data.usable(r) and r.label in (USEFUL, NOISY))
    for r in kept:
        r.split = sim_data.split_of(r.question, c.val_fraction)
    chosen = sim_data.balance(kept, seed=cfg.seed) if c.balance else kept
    counts = {"kept": len(kept), "before_balance": sim_data.label_counts(kept),
              "dataset": sim_data.label_counts(chosen)}
    return chosen, counts


def write_dataset(out: Path, records: list[SearchRecord], chosen: list[SearchRecord], summary: dict) -> None:
    chosen_ids = {id(r) for r in chosen}
    sim_data.write_jsonl(out / "records.jsonl", [{**row, "in_dataset": id(r) in chosen_ids}
                                            for r, row in zip(records, sim_data.record_rows(records))])
    for split in ("train", "val"):
        sim_data.write_jsonl(out / f"sft_{split}.jsonl", [sim_data.sft_example(r) for r in chosen if r.split == split])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


def previous_collection(out: Path) -> tuple[list[SearchRecord], dict[str, Any]]:
    """The records and summary a collection wrote into ``out``, labels and splits cleared."""
    path = out / "records.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"simulation.collect.relabel=true: {path} does not exist; collect first")
    records = sim_data.read_records(path)
    for r in records:
        r.label, r.split = "", ""
    return records, json.loads((out / "summary.json").read_text())


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(dict_cfg: DictConfig) -> None:
    import ray

    from launch.assets import resolve_policy
    from launch.driver.cluster import init_ray
    from launch.driver.warmup import should_warm_up, warm_up
    from launch.paths import ensure_data, resolve

    cfg: Config = OmegaConf.to_object(dict_cfg)
    c = cfg.simulation.collect
    if c.engine not in REAL_ENGINES:
        raise ValueError(f"simulation.collect.engine={c.engine!r}: collection needs a real engine, one of "
                         f"{list(REAL_ENGINES)}")
    files = ensure_data(cfg.data)
    out = resolve(cfg.simulation.dir) / "data"
    init_ray(cfg)
    try:
        if c.relabel:  # the searches of an earlier collection, labelled afresh
            records, earlier = previous_collection(out)
            policy, collection = earlier["policy"], earlier["collection"]
        else:
            policy = resolve_policy(cfg.model.name)  # an asset, an HF folder or hub id, or a training run folder
            if should_warm_up(cfg.train.warmup, policy, cfg.warmup.max_params):
                policy, _ = warm_up(cfg, policy, files["train"], files["corpus"], Path(dict_cfg.logger.run_dir))
            records, collection = collect(cfg, policy, files["train"], files["corpus"])
        labelling = label_all(cfg, records)
    finally:
        ray.shutdown()
    chosen, dataset = build_dataset(cfg, records)
    summary = {"policy": policy, "engine": c.engine, "collection": collection, "labelling": labelling, **dataset,
               "config": dataclasses.asdict(c)}
    write_dataset(out, records, chosen, summary)
    counts = dataset["dataset"]
    print(f"collected {collection['searches']} searches from {collection['episodes']} episodes "
          f"({collection['correct_episodes']} correct) in {collection['seconds']:.0f}s; label {labelling['rule']} "
          f"(v1/rule agreement {labelling['v1_rule_agreement']:.2f}); dataset: train {counts['train']}, "
          f"val {counts['val']}; written to {out}", flush=True)
    if not any(counts["train"].values()):
        raise SystemExit("the training split is empty: the policy made no usable search. Does it follow the search "
                         "protocol (train.warmup=on warms a small model up)? Or collect more questions")
    missing = [label for label, n in counts["train"].items() if not n]
    if missing:
        print(f"warning: no {missing[0]} examples in the training split; the tuned simulator will not learn to write "
              f"them. Collect more questions or samples, or change simulation.collect.label", flush=True)


if __name__ == "__main__":
    main()
