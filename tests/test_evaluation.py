"""Evaluation metrics on hand-made predictions, and benchmark files by name."""

from __future__ import annotations

import json

import pytest

from actors.evaluation import EvalRecord, dataset_metrics, flat_rows, markdown_table, summarize
from launch.benchmarks import BenchmarkNotFound, benchmark_examples
from tests.conftest import REPO_ROOT

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "data"


def _record(dataset, prediction, golds, **kw):
    return EvalRecord(dataset, f"{dataset}-{prediction}", "q?", tuple(golds), prediction, **kw)


def test_metrics_by_hand():
    records = [
        # exact after normalisation (case, article, punctuation): EM 1, SubEM 1, F1 1
        _record("nq", "The Herman Melville.", ["Herman Melville"], searches=1, generated_tokens=30, turns=2),
        # gold inside a longer answer: EM 0, SubEM 1, F1 = 2·(2/4·2/2)/(2/4+2/2) = 2/3
        _record("nq", "novelist herman melville wrote", ["Herman Melville"], searches=2, generated_tokens=50, turns=3,
                invalid_actions=1),
        # no <answer> at all: 0 everywhere
        _record("nq", None, ["Canberra"], searches=0, generated_tokens=100, turns=4, invalid_actions=3),
        # partial overlap: "river seine" vs gold "Seine": EM 0, SubEM 1, F1 = 2·(1/2·1)/(1/2+1) = 2/3
        _record("hotpotqa", "river seine", ["the Seine", "Sena"], searches=1, generated_tokens=20, turns=2),
    ]
    nq = dataset_metrics(records[:3])
    assert nq["em"] == pytest.approx(100 / 3)
    assert nq["subem"] == pytest.approx(200 / 3)
    assert nq["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert nq["searches"] == pytest.approx(1.0) and nq["tokens"] == pytest.approx(60.0)
    assert nq["invalid_rate"] == pytest.approx(4 / 9)  # 4 invalid of 9 turns
    table = summarize(records)
    assert list(table) == ["nq", "hotpotqa", "avg"]  # the paper's order, then the average
    assert table["hotpotqa"]["subem"] == 100.0 and table["hotpotqa"]["em"] == 0.0
    assert table["avg"]["subem"] == pytest.approx((200 / 3 + 100) / 2)  # unweighted over datasets, as the paper
    assert table["avg"]["n"] == 4


def test_markdown_table_and_flat_rows():
    results = {"direct": summarize([_record("nq", "x", ["y"]), _record("bamboogle", "y", ["y"])]),
               "agent": summarize([_record("nq", "y", ["y"]), _record("bamboogle", "y", ["y"])])}
    lines = markdown_table(results).splitlines()
    assert lines[0] == "| subem | nq | bamboogle | **Avg** |"
    assert lines[2] == "| direct | 0.00 | 100.00 | **50.00** |"
    assert lines[3] == "| agent | 100.00 | 100.00 | **100.00** |"
    rows = flat_rows(results)
    assert len(rows) == 6 and {r["method"] for r in rows} == {"direct", "agent"}
    assert json.dumps(rows)  # plain numbers and strings: CSV, JSON and W&B take them as they are


def test_benchmarks_by_name_follow_the_split_rule_and_the_parquet(tmp_path):
    nq = benchmark_examples(FIXTURES, "nq")
    assert len(nq) == 3 and nq[0].question == "who wrote the novel moby dick" and nq[0].data_source == "nq"
    assert len(benchmark_examples(FIXTURES, "nq", limit=2)) == 2
    # hotpotqa has no folder: its rows come from the ZeroSearch test.parquet
    (tmp_path / "test.parquet").write_bytes((FIXTURES / "zerosearch_test.parquet").read_bytes())
    hotpot = benchmark_examples(tmp_path, "hotpotqa")
    assert len(hotpot) == 2 and {e.data_source for e in hotpot} == {"hotpotqa"}
    # dev is used when there is no test split
    (tmp_path / "musique").mkdir()
    (tmp_path / "musique" / "dev.jsonl").write_text(json.dumps({"id": "d0", "question": "q", "golden_answers": ["a"]}))
    assert [e.question for e in benchmark_examples(tmp_path, "musique")] == ["q"]


def test_missing_benchmark_names_every_file_it_tried(tmp_path):
    with pytest.raises(BenchmarkNotFound) as error:
        benchmark_examples(tmp_path, "popqa")
    message = str(error.value)
    assert "popqa" in message
    for tried in ("popqa/test.jsonl", "popqa/dev.jsonl", "popqa/train.jsonl", "popqa.jsonl", "test.parquet"):
        assert tried in message
    with pytest.raises(ValueError, match="unknown benchmark 'nqq'"):
        benchmark_examples(tmp_path, "nqq")


def test_synthetic_test_split_reports_under_one_name(synthetic_world):
    examples = benchmark_examples(synthetic_world["test"].parent, "synthetic", limit=50)
    assert len(examples) == 50 and {e.data_source for e in examples} == {"synthetic"}


@pytest.mark.slow
def test_harness_runs_direct_rag_and_agent_on_the_synthetic_test_split(tmp_path):
    import csv
    import subprocess
    import sys

    out = tmp_path / "eval"
    # Two engines: the questions are split 2 + 1 between them and must come back in order, each to its own record.
    cmd = [sys.executable, "-m", "launch.evaluate", "model=tiny_llama", "eval.limit=3", "cluster.rollout_engines=2",
           "rollout.episode.max_tokens_per_turn=16", "logger.wandb.mode=offline", f"logger.run_dir={out}",
           f"hydra.run.dir={tmp_path / 'hydra'}"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "| subem | synthetic | **Avg** |" in result.stdout
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"direct", "rag", "agent"}
    assert results["direct"]["synthetic"]["searches"] == 0.0  # no engine call
    assert results["rag"]["synthetic"]["searches"] == 1.0  # exactly one retrieval per question
    for method in results.values():
        assert method["synthetic"]["n"] == 3.0 and 0.0 < method["synthetic"]["tokens"] <= 16 * 3
        assert 0.0 <= method["synthetic"]["subem"] <= 100.0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 9 and len({(r["method"], r["uid"]) for r in records}) == 9
    questions = [e.question for e in benchmark_examples(REPO_ROOT / "data" / "synthetic", "synthetic", limit=3)]
    for method in ("direct", "rag", "agent"):
        assert [r["question"] for r in records if r["method"] == method] == questions
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 6  # (direct, rag, agent) x (synthetic, avg)
    assert (out / "results.md").read_text().count("| agent |") == 6  # one row per metric table
    assert list((out / "wandb").glob("offline-run-*"))  # the W&B run with the results table


def test_agent_episodes_run_in_chunks_of_in_flight_per_engine():
    from launch.evaluate import in_flight_chunks

    requests = list(range(10))
    assert in_flight_chunks(requests, 3, 1) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert in_flight_chunks(requests, 3, 2) == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert in_flight_chunks(requests, 0, 2) == [requests]
    assert [r for chunk in in_flight_chunks(requests, 4, 1) for r in chunk] == requests  # nothing lost or repeated
