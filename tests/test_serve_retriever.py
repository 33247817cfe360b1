"""`python -m launch.serve_retriever` as a real subprocess, queried through `HttpRetriever` and raw HTTP.

The BM25 server runs as the user would start it; the dense server is exercised in-process through its ASGI app,
which avoids loading the encoder a second time in a child process.
"""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from launch.serve_retriever import create_app
from simulator.base import SearchContext
from simulator.engines import DenseSearch, HttpRetriever, MiniLMEncoder

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).parent / "fixtures" / "engines" / "corpus.jsonl"
START_TIMEOUT_S = 90


def _first_line(stream, timeout_s: float) -> str:
    """The first line the server prints, or "" if none came in time (a reader thread, so we never block forever)."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout_s)
    except queue.Empty:
        return ""


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """Start the BM25 server on a free port; yield its base URL; always stop it."""
    workdir = tmp_path_factory.mktemp("serve")
    corpus = shutil.copy(CORPUS, workdir / "corpus.jsonl")
    stderr_path = workdir / "stderr.log"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "launch.serve_retriever", "--corpus", str(corpus), "--port", "0", "--top-k", "3"],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            line = _first_line(proc.stdout, START_TIMEOUT_S)
            prefix = "serve_retriever: listening on "
            assert line.startswith(prefix), f"server did not start: {line!r}\n{stderr_path.read_text()}"
            url = line[len(prefix) :].split()[0]
            assert url.startswith("http://127.0.0.1:")  # loopback unless told otherwise
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_health(server):
    reply = httpx.get(f"{server}/health", timeout=10)
    assert reply.status_code == 200
    assert reply.json() == {"status": "ok", "engine": "bm25", "num_docs": 20, "top_k": 3}


@pytest.mark.parametrize("request_shape", ["zerosearch", "search-r1"])
def test_http_retriever_reads_the_server_in_both_request_shapes(server, request_shape):
    engine = HttpRetriever(f"{server}/retrieve", request_shape=request_shape, timeout_s=10)
    result = asyncio.run(engine.search("Who founded Brannock Ironworks in Quillmere?", SearchContext(top_k=2)))
    assert not result.meta.failed, result.meta.error
    assert len(result.documents) == 2
    assert result.documents[0].startswith("Brannock Ironworks\nBrannock Ironworks is a shipbuilding company")
    assert result.text.startswith("Doc 1: Brannock Ironworks Brannock Ironworks is a shipbuilding company")


def test_single_query_answer_shape(server):
    reply = httpx.post(f"{server}/retrieve", json={"query": "Brannock Ironworks"}, timeout=10)
    assert reply.status_code == 200
    hits = reply.json()["result"]
    assert 1 <= len(hits) <= 3  # the server's --top-k when the request gives none
    assert hits[0]["id"] == "d03"
    assert set(hits[0]) == {"id", "title", "text", "contents", "score"}
    assert hits[0]["contents"] == hits[0]["title"] + "\n" + hits[0]["text"]


def test_search_r1_batch_answer_shape(server):
    queries = ["Who wrote the novel The Glass Owl?", "Lunvale goat cheese aged in caves"]
    scored = httpx.post(f"{server}/retrieve", json={"queries": queries, "topk": 2, "return_scores": True}, timeout=10)
    assert scored.status_code == 200
    rows = scored.json()["result"]
    assert [row[0]["document"]["id"] for row in rows] == ["d06", "d11"]
    assert all(len(row) <= 2 for row in rows)
    scores = [hit["score"] for hit in rows[0]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0

    plain = httpx.post(f"{server}/retrieve", json={"queries": queries, "topk": 2}, timeout=10).json()["result"]
    assert [row[0]["id"] for row in plain] == ["d06", "d11"]
    assert "score" not in plain[0][0]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"q": "typo"}, "'query'"),
        ({"query": 5}, "'query'"),
        ({"queries": "not a list"}, "'queries'"),
        ({"query": "x", "top_k": 0}, "'top_k'"),
        ({"queries": ["x"], "topk": "five"}, "'topk'"),
        ({"query": "x", "return_scores": "yes"}, "'return_scores'"),
        (["x"], "JSON object"),
    ],
)
def test_bad_request_names_the_key(server, body, named):
    reply = httpx.post(f"{server}/retrieve", json=body, timeout=10)
    assert reply.status_code == 400
    assert named in reply.json()["detail"]


def test_body_that_is_not_json_is_a_400(server):
    reply = httpx.post(f"{server}/retrieve", content=b"query=x", timeout=10)
    assert reply.status_code == 400
    assert "JSON" in reply.json()["detail"]


def test_dense_engine_behind_the_app(tmp_path):
    engine = DenseSearch(shutil.copy(CORPUS, tmp_path / "corpus.jsonl"), encoder=MiniLMEncoder(batch_size=8))

    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/retrieve", json={"query": "village known for making clocks", "top_k": 2})

    reply = asyncio.run(ask())
    assert reply.status_code == 200
    hits = reply.json()["result"]
    assert [len(hits), hits[0]["id"]] == [2, "d18"]
