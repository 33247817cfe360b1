"""Simulation tuning end to end on the real stack: collection with a real policy engine and real BM25, and the SFT of
a simulator whose export a vLLM simulator server then loads.

tiny-llama is a random model, so collection constrains its first turn to a search (vLLM's structured outputs); its
queries are then real generations under that grammar and its documents real BM25 results.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow
GUIDED_CORPUS_SEARCH = "<search> (born|river|founded|city|company) [a-z]{2,8} </search>"


def run_cli(module: str, *overrides: str, timeout: float = 900) -> str:
    result = subprocess.run([sys.executable, "-m", module, *overrides], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_collection_writes_records_with_every_field(synthetic_world, tmp_path):
    from actors.reward import substring_match
    from simulator.engines import load_corpus
    from simulator.tuning_data import RECORD_KEYS, label_rule, label_v1, read_records, read_sft_examples

    sim_dir = tmp_path / "sim"
    out = run_cli(
        "launch.collect_sim_data", "model=tiny_llama", "simulator=tiny", f"data.dir={synthetic_world['corpus'].parent}",
        f"simulation.dir={sim_dir}", f"hydra.run.dir={tmp_path / 'logs'}", "logger.wandb.mode=disabled",
        # A random 2-layer model never writes </search> by chance: its first turn is a search under a grammar whose
        # first word is one the corpus holds, so BM25 finds documents for it. (A warm-up of 80 SFT steps did this
        # in three times the time; the warm-up itself is tested in tests/test_warmup.py.)
        "train.warmup=off", "rollout.episode.max_tokens_per_turn=24",
        f"rollout.guided_first_turn_regex='{GUIDED_CORPUS_SEARCH}'",
        "simulation.collect.questions=8", "simulation.collect.samples_per_question=1",
        "simulation.collect.temperature=0", "simulation.collect.label=rule", "simulation.collect.balance=false",
        "search.top_k=3", "simulation.collect.val_fraction=0.25")
    assert "collected" in out

    rows = [json.loads(line) for line in (sim_dir / "data" / "records.jsonl").read_text().splitlines()]
    assert len(rows) >= 4, out  # 8 greedy episodes of a policy warmed up to search
    corpus = {" ".join(d.contents.split()) for d in load_corpus(synthetic_world["corpus"])}
    for row in rows:
        assert set(RECORD_KEYS) <= set(row) and {"label", "split", "in_dataset", "question_id", "turn"} <= set(row)
        assert row["query"].strip() and row["question"] and row["golden_answers"]
        assert 1 <= len(row["documents"]) <= 3
        assert all(" ".join(doc.split()) in corpus for doc in row["documents"])  # real BM25 documents, verbatim
        assert row["label"] in ("useful", "noisy") and row["split"] in ("train", "val")
        assert row["correct"] == (row["final_answer"] is not None
                                  and substring_match(row["final_answer"], row["golden_answers"]) > 0)
    for record in read_records(sim_dir / "data" / "records.jsonl"):
        assert record.label == label_rule(record)

    summary = json.loads((sim_dir / "data" / "summary.json").read_text())
    assert summary["collection"]["episodes"] == 8 and summary["collection"]["searches"] == len(rows)
    train = read_sft_examples(sim_dir / "data" / "sft_train.jsonl")
    assert len(train) == sum(r["in_dataset"] and r["split"] == "train" for r in rows)
    assert all(e["completion"].startswith("Doc 1: ") for e in train)

    # The same searches labelled again by the paper's v1 rule, without collecting: only the labels change.
    run_cli("launch.collect_sim_data", f"data.dir={synthetic_world['corpus'].parent}", f"simulation.dir={sim_dir}",
            f"hydra.run.dir={tmp_path / 'logs'}", "simulation.collect.relabel=true", "simulation.collect.label=v1",
            "simulation.collect.balance=false", "simulation.collect.val_fraction=0.25")
    relabelled = read_records(sim_dir / "data" / "records.jsonl")
    assert [(r.question, r.query, r.documents) for r in relabelled] == [(r["question"], r["query"], r["documents"])
                                                                         for r in rows]
    assert all(r.label == label_v1(r) for r in relabelled)
    assert json.loads((sim_dir / "data" / "summary.json").read_text())["labelling"]["rule"] == "v1"


def _write_sft_files(world, data_dir, n_train: int, n_val: int) -> None:
    """Examples made the way collection makes them: BM25's documents for each question, labelled by the rule."""
    from actors.dataset import load_qa
    from simulator.engines import BM25Search
    from simulator.tuning_data import SearchRecord, label_rule, sft_example, write_jsonl

    engine = BM25Search(world["corpus"], top_k=3)
    examples = load_qa(world["train"])[: n_train + n_val]
    docs = engine.retrieve([e.question for e in examples])
    records = []
    for e, found in zip(examples, docs):
        record = SearchRecord(e.question, list(e.golden_answers), e.question.rstrip("?"), [d.contents for d in found],
                              None, False)
        record.label = label_rule(record)
        records.append(record)
    write_jsonl(data_dir / "sft_train.jsonl", [sft_example(r) for r in records[:n_train]])
    write_jsonl(data_dir / "sft_val.jsonl", [sft_example(r) for r in records[n_train:]])


def test_tuning_lowers_the_loss_exports_a_simulator_vllm_serves_and_resumes(synthetic_world, tmp_path, ray_local):
    import ray

    from simulator.config import SimulatorConfig
    from simulator.pool_actor import create_simulator_pool

    sim_dir = tmp_path / "sim"
    _write_sft_files(synthetic_world, sim_dir / "data", n_train=16, n_val=8)
    args = ["simulator=tiny", f"data.dir={synthetic_world['corpus'].parent}", f"simulation.dir={sim_dir}",
            f"hydra.run.dir={tmp_path / 'logs'}", "logger.wandb.mode=offline", "simulation.tune.steps=8",
            "simulation.tune.batch_size=4", "simulation.tune.lr=3e-3", "simulation.tune.lr_warmup_steps=0",
            "simulation.tune.save_every=4", "simulation.tune.eval_every=4", "simulation.tune.eval_examples=8"]
    out = run_cli("launch.tune_simulator", *args)

    tuned = sim_dir / "tuned"
    summary = json.loads((tuned / "hf" / "tuning.json").read_text())
    metrics = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    losses = [m["sft/loss"] for m in metrics]
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert sum(losses[-2:]) / 2 < losses[0] - 1.0, losses  # a random model's ~10.8 nats fall fast
    heldout = summary["heldout_loss"]
    assert set(heldout) == {"0", "4", "8"} and heldout["8"] < heldout["0"] - 1.0, heldout
    assert (tuned / "checkpoints" / "step_4" / "tune_state.json").is_file()
    assert list(tuned.glob("wandb/offline-run-*")), "no offline W&B run"
    assert "simulator.mode=sft" in out

    # vLLM serves the export as a simulator in SFT mode
    pool = create_simulator_pool(SimulatorConfig(model=str(tuned / "hf"), mode="sft", max_tokens=16,
                                                 health_check_interval_s=0.0, startup_timeout_s=600))
    try:
        reply = ray.get(pool.generate.remote("You are the Google search engine.\nQuery: x\nUseful Output:\n"),
                        timeout=300)
    finally:
        ray.get(pool.shutdown.remote(), timeout=60)
        ray.kill(pool)
    assert not reply.get("failed") and reply["num_tokens"] > 0, reply

    # A rerun continues from the newest checkpoint (step 4): steps 5-8 again, the metrics file without a repeat.
    out = run_cli("launch.tune_simulator", *args)
    assert "resuming from" in out and "step 4" in out
    steps = [json.loads(line)["step"] for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
