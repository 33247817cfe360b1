"""The simulator report: its metrics worked out by hand, its markdown, its inputs, and one real run over tiny-llama.

The end-to-end test runs the CLI in a subprocess: a held-out file about a small synthetic world, real BM25 over that
world's corpus, and tiny-llama as both the base (prompt mode) and the "tuned" (sft mode) simulator.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch.config import Config
from launch.simulator_report import (
    METRICS,
    REAL_KINDS,
    SIMULATOR_KINDS,
    answer_gap,
    load_queries,
    render_markdown,
    reply_metrics,
    tuned_model,
)
from simulator.base import SearchMeta, SearchResult, failed_result
from simulator.tuning_data import SearchRecord, record_rows, write_jsonl
from tests.conftest import REPO_ROOT


def _reply(documents: list[str], tokens: int, latency_s: float) -> SearchResult:
    return SearchResult(documents=documents, meta=SearchMeta(engine="simulated", num_tokens=tokens,
                                                             latency_s=latency_s))


ANSWERED = _reply(["Ada Quill was born in Norhaven.", "She paints."], tokens=30, latency_s=1.0)  # 6 + 2 words
UNANSWERED = _reply(["Brightwell makes glass.", "It was founded in 1900."], tokens=50, latency_s=2.0)  # 3 + 5 words
FAILED = failed_result("simulated", "the simulator returned no documents", latency_s=6.0)


def test_metrics_of_two_replies_one_with_the_answer():
    m = reply_metrics([ANSWERED, UNANSWERED], [["Norhaven"], ["Tom Reyes"]], top_k=2, seconds=4.0)
    assert m["n"] == 2 and m["answer_in_reply"] == 0.5
    assert m["answer_in_document"] == 0.25  # 1 of 4 documents
    assert m["format_valid"] == 1.0 and m["documents_per_reply"] == 2.0
    assert m["words_per_document"] == 4.0  # (6 + 2 + 3 + 5) / 4
    assert m["failed"] == 0 and m["latency_s_mean"] == 1.5 and m["latency_s_p50"] == 1.5
    assert m["tokens_per_s"] == 20.0  # 80 tokens in 4 seconds


def test_a_failed_search_counts_as_a_reply_without_documents():
    # The fallback text "No information available" must not count as an answer even when the answer is "information".
    m = reply_metrics([ANSWERED, UNANSWERED, FAILED], [["Norhaven"], ["Tom Reyes"], ["information"]], top_k=2,
                      seconds=4.0)
    assert m["n"] == 3 and m["failed"] == 1
    assert m["answer_in_reply"] == pytest.approx(1 / 3, abs=1e-4)
    assert m["answer_in_document"] == 0.25  # documents: the same 4
    assert m["format_valid"] == pytest.approx(2 / 3, abs=1e-4)
    assert m["documents_per_reply"] == pytest.approx(4 / 3, abs=1e-4)
    assert m["words_per_document"] == 4.0
    assert m["latency_s_mean"] == 3.0 and m["latency_s_p50"] == 2.0


def test_a_real_engine_has_no_token_rate_and_an_empty_group_has_no_figures():
    real = reply_metrics([ANSWERED], [["Norhaven"]], top_k=5)
    assert real["tokens_per_s"] is None and real["format_valid"] == 0.0  # 2 documents, not 5
    empty = reply_metrics([], [], top_k=5)
    assert empty["n"] == 0 and empty["failed"] == 0
    assert all(empty[m] is None for m in METRICS if m != "failed")


def test_gap_is_useful_minus_noisy_answer_rate():
    metrics = {"useful": {"answer_in_reply": 0.5}, "noisy": {"answer_in_reply": 0.125},
               "none": {"answer_in_reply": None}}
    assert answer_gap(metrics, "useful", "noisy") == 0.375
    assert answer_gap(metrics, "useful", "none") is None


def _report() -> dict:
    useful = reply_metrics([ANSWERED, ANSWERED], [["Norhaven"]] * 2, top_k=2, seconds=2.0)
    noisy = reply_metrics([ANSWERED, UNANSWERED], [["Norhaven"]] * 2, top_k=2, seconds=2.0)
    sim = {"model": "tiny-llama", "mode": "prompt", "metrics": {"useful": useful, "noisy": noisy}, "gap": 0.5}
    real = {"engine": "bm25", "gap": None,
            "metrics": {"all": noisy, "useful_labelled": useful, "noisy_labelled": reply_metrics([], [], top_k=2)}}
    return {"file": "records.jsonl", "queries": 2, "top_k": 2, "max_tokens": 32, "temperature": 0.8,
            "sources": {"base": sim, "tuned": {**sim, "mode": "sft"}, "real": real},
            "skipped": {"other": "for the test"}}


def test_markdown_has_a_row_per_source_and_kind_and_a_gap_line_per_source():
    text = render_markdown(_report())
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]  # minus header
    assert [tuple(cell.strip() for cell in row.split("|")[1:3]) for row in rows] == [
        ("base", "useful"), ("base", "noisy"), ("tuned", "useful"), ("tuned", "noisy"),
        ("real", "all"), ("real", "useful_labelled"), ("real", "noisy_labelled")]
    (header,) = [line for line in text.splitlines() if line.startswith("| source | kind |")]
    assert all(f" {m} " in header for m in METRICS)
    assert "| real | noisy_labelled | 0 | – |" in text  # no queries: no figures, shown as a dash
    assert "| base | useful | 2 | 1.000 | 0.500 | 1.000 | 2.000 | 4.0 | 0 |" in text
    assert "- **base** (`tiny-llama`, prompt mode): answer-in-reply gap, useful − noisy: 0.500; useful 1.000 " \
           "against the real engine's 0.500" in text
    assert "- **tuned** (`tiny-llama`, sft mode)" in text and "- **real** (`bm25`)" in text
    assert "- **other**: skipped (for the test)" in text


def _record(question: str, query: str, label: str, answer: str = "Norhaven", split: str = "val") -> SearchRecord:
    """Training-split and unlabelled records are not held-out queries."""
    return SearchRecord(question=question, golden_answers=[answer], query=query, documents=[f"{query} is in {answer}."],
                        final_answer=answer, correct=label == "useful", label=label, split=split)


def test_held_out_queries_are_the_first_distinct_pairs(tmp_path, capsys):
    path = tmp_path / "records.jsonl"
    records = [_record("Q1?", "q1", "useful"), _record("Q1?", "q1", "noisy"), _record("Q1?", "q1 again", "noisy"),
               _record("Q0?", "q0", "useful", split="train"), _record("Q3?", "q3", "", split="val"),
               _record("Q2?", "q2", "noisy")]
    write_jsonl(path, record_rows(records))
    rows = load_queries(path, 2)
    assert [(r["question"], r["query"], r["label"]) for r in rows] == [("Q1?", "q1", "useful"),
                                                                       ("Q1?", "q1 again", "noisy")]
    assert capsys.readouterr().out == ""
    assert len(load_queries(path, 10)) == 3  # fewer than asked: all of them, and a note
    assert "holds 3 distinct held-out queries, fewer than the 10 asked for" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="launch.collect_sim_data"):
        load_queries(tmp_path / "missing.jsonl", 2)


def test_the_tuned_simulator_is_the_configured_one_else_the_tune_output(tmp_path, tiny_llama_path):
    cfg = Config()
    cfg.simulation.dir = str(tmp_path)
    assert tuned_model(cfg) is None
    (tmp_path / "tuned" / "hf").mkdir(parents=True)
    assert tuned_model(cfg) == str(tmp_path / "tuned" / "hf")
    cfg.simulation.report.tuned = "tiny-llama"  # an asset name
    assert tuned_model(cfg) == str(tiny_llama_path)


@pytest.mark.slow
def test_report_runs_base_tuned_and_real_engine(tmp_path, synthetic_world, tiny_llama_path):
    import pyarrow.parquet as pq

    # Held-out rows about the world the real engine searches; labels alternate so both label groups have queries,
    # and the last row repeats the first pair (it must not be measured twice).
    questions = pq.read_table(synthetic_world["val"]).to_pylist()[:4]
    records = [SearchRecord(question=q["question"], golden_answers=list(q["golden_answers"]), query=q["question"],
                            documents=[f"A passage about {q['question']}"], final_answer=None, correct=False,
                            label="useful" if i % 2 == 0 else "noisy", split="val") for i, q in enumerate(questions)]
    records.append(SearchRecord(**{**records[0].__dict__, "label": "noisy"}))
    sim_dir = tmp_path / "simulation"
    write_jsonl(sim_dir / "data" / "records.jsonl", record_rows(records))

    cmd = [sys.executable, "-m", "launch.simulator_report", f"simulation.dir={sim_dir}", "simulator=tiny",
           "simulation.report.queries=10", "simulation.report.max_tokens=32", "simulation.report.timeout_s=600",
           "simulation.report.tuned=tiny-llama", f"data.dir={synthetic_world['corpus'].parent}",
           f"hydra.run.dir={tmp_path / 'hydra'}"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    assert "holds 4 distinct held-out queries, fewer than the 10 asked for" in result.stdout
    assert "| real | noisy_labelled |" in result.stdout

    report = json.loads((sim_dir / "report.json").read_text())
    assert report["queries"] == 4 and report["top_k"] == 5 and report["skipped"] == {}
    sources = report["sources"]
    assert list(sources) == ["base", "tuned", "real"]
    assert (sources["base"]["mode"], sources["tuned"]["mode"]) == ("prompt", "sft")
    assert sources["tuned"]["model"] == str(tiny_llama_path)
    expected_kinds = {"base": SIMULATOR_KINDS, "tuned": SIMULATOR_KINDS, "real": REAL_KINDS}
    for name, source in sources.items():
        assert tuple(source["metrics"]) == expected_kinds[name]
        assert "gap" in source and source["examples"]
        for kind, m in source["metrics"].items():
            assert set(METRICS) <= set(m), (name, kind)
            assert m["n"] == {"useful_labelled": 2, "noisy_labelled": 2}.get(kind, 4)
            assert 0 <= m["failed"] <= m["n"]
            for share in ("answer_in_reply", "answer_in_document", "format_valid"):
                assert m[share] is None or 0.0 <= m[share] <= 1.0, (name, kind, share)
            assert 0.0 <= m["documents_per_reply"] <= 5 and m["latency_s_mean"] >= 0.0
            if name == "real":
                assert m["tokens_per_s"] is None
            else:
                assert m["tokens_per_s"] > 0 and m["seconds"] > 0
    real_all = sources["real"]["metrics"]["all"]
    assert real_all["failed"] == 0 and real_all["documents_per_reply"] > 0 and real_all["words_per_document"] > 0
    assert set(sources["base"]["examples"]) == {"useful", "noisy"}
    assert set(sources["real"]["examples"]) == {"useful_labelled", "noisy_labelled"}
    markdown = (sim_dir / "report.md").read_text()
    assert markdown.count("| base |") == 2 and markdown.count("| tuned |") == 2 and markdown.count("| real |") == 3
    assert not list(sim_dir.glob(".*tmp*"))  # atomic writes leave nothing behind
