"""Inference: the trace renderer on hand-written text, and ``launch.infer`` driven through stdin with BM25."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from actors.protocol import INVALID_ACTION_MESSAGE
from actors.trace import render_trace, trace_segments
from tests.conftest import REPO_ROOT


def test_trace_segments_in_order_with_text_between_and_an_unclosed_tag():
    text = ("<think> I need the capital. </think> <search> capital of France </search>\n\n<information>Doc 1: Paris is "
            "the capital.</information>\n\n" + INVALID_ACTION_MESSAGE + "<answer> Paris </answer> done <think> cut")
    assert trace_segments(text) == [
        ("think", "I need the capital."), ("search", "capital of France"),
        ("information", "Doc 1: Paris is the capital."),
        ("invalid", "the action was not a search or an answer; the policy is told to retry"),
        ("answer", "Paris"), ("text", "done"), ("think", "cut"),
    ]


def test_render_trace_labels_and_shortens_information():
    rendered = render_trace("<search> q </search><information>" + "x" * 50 + "</information><answer> A </answer>",
                            max_information_chars=10)
    assert rendered.splitlines() == ["[search] q", "[information] xxxxxxxxxx …", "[ANSWER] A"]


@pytest.mark.slow
def test_infer_answers_questions_typed_on_stdin_with_real_bm25(tmp_path, synthetic_world):
    # An untrained model's first turn is constrained to a search for a name the world's corpus holds.
    name = json.loads(synthetic_world["corpus"].read_text().splitlines()[0])["contents"].split("\n")[0]
    cmd = [sys.executable, "-m", "launch.infer", "model=tiny_llama",
           f"search.corpus_file={synthetic_world['corpus']}", "rollout.episode.max_tokens_per_turn=24",
           "search.top_k=3",
           f"rollout.guided_first_turn_regex='<search> {name} </search>'"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, input=f"Where was {name} born?\nwho is he\n\n",
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert out.count("[search] ") >= 2  # both questions searched (the first turn is guided)
    assert f"[information]\nDoc 1: {name}" in out  # BM25 over the world's corpus found the person...
    assert "Doc 3:" in out and "Doc 4:" not in out  # ...and returned top_k = 3 documents
    assert out.count("searches,") == 2  # one summary line per question, then the empty line ended the session

    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question": "Who founded Rerza Foundry?"}) + "\n")
    batch = subprocess.run([*cmd, f"infer.input={questions}"], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=600)
    assert batch.returncode == 0, batch.stderr[-4000:]
    [row] = [json.loads(line) for line in (tmp_path / "questions.answers.jsonl").read_text().splitlines()]
    assert row["question"] == "Who founded Rerza Foundry?" and len(row["searches"]) >= 1 and row["response"]
