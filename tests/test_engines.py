"""Real search engines on a 20-passage fictional corpus, and the HTTP engines against real local servers.

Nothing here mocks an engine: BM25 runs bm25s, dense search runs the packaged MiniLM encoder and faiss, and the HTTP
engines talk to stdlib HTTP servers on 127.0.0.1 that answer the way a `/retrieve` server or SerpAPI does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import shutil
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest

from simulator.base import NO_INFORMATION, SearchContext
from simulator.engines import (
    BM25Search,
    CorpusFormatError,
    DenseSearch,
    HttpRetriever,
    MiniLMEncoder,
    SerpApiSearch,
    build_real_engine,
    load_corpus,
    parse_retrieve_response,
)

FIXTURES = Path(__file__).parent / "fixtures" / "engines"
CORPUS = FIXTURES / "corpus.jsonl"

# Queries whose answer passage we wrote: BM25 needs shared words, dense search gets paraphrases.
BM25_QUERIES = [
    ("Who founded Brannock Ironworks?", "d03"),
    ("Which mathematician proved the lantern conjecture?", "d13"),
    ("Who wrote the novel The Glass Owl?", "d06"),
    ("first person to swim across the Grey Strait", "d19"),
    ("Lunvale goat cheese aged in caves", "d11"),
]
DENSE_QUERIES = [
    ("a flower that blooms only in the dark", "d09"),
    ("village known for making clocks", "d18"),
    ("which mountains have Mount Veyra as their tallest summit", "d16"),
    ("a boat racing competition between university teams", "d10"),
    ("telescope for looking at comets", "d08"),
]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A private copy of the fixture corpus, so that the index written beside it lands in tmp_path."""
    return Path(shutil.copy(CORPUS, tmp_path / "corpus.jsonl"))


@pytest.fixture(scope="module")
def encoder() -> MiniLMEncoder:
    return MiniLMEncoder(batch_size=8)


@pytest.fixture(scope="module")
def bm25(tmp_path_factory) -> BM25Search:
    return BM25Search(shutil.copy(CORPUS, tmp_path_factory.mktemp("bm25") / "corpus.jsonl"))


@pytest.fixture(scope="module")
def dense(tmp_path_factory, encoder) -> DenseSearch:
    return DenseSearch(shutil.copy(CORPUS, tmp_path_factory.mktemp("dense") / "corpus.jsonl"), encoder=encoder)


# ---------------------------------------------------------------------------------------------------------------------
# Corpus


def test_load_corpus_splits_title_and_text():
    docs = load_corpus(CORPUS)
    assert len(docs) == 20
    assert docs[2].id == "d03"
    assert docs[2].title == "Brannock Ironworks"
    assert docs[2].text.startswith("Brannock Ironworks is a shipbuilding company")
    assert docs[2].contents == docs[2].title + "\n" + docs[2].text


def test_load_corpus_accepts_title_text_shape_and_integer_ids(tmp_path):
    path = tmp_path / "dpr.jsonl"
    path.write_text('{"id": 7, "title": "Ostrelle", "text": "A port town."}\n\n', encoding="utf-8")
    (doc,) = load_corpus(path)
    assert (doc.id, doc.title, doc.text, doc.contents) == ("7", "Ostrelle", "A port town.", "Ostrelle\nA port town.")


@pytest.mark.parametrize(
    ("bad_line", "field"),
    [
        ('{"contents": "Title\\ntext"}', "'id'"),
        ('{"id": "x9"}', "'contents'"),
        ('{"id": "x9", "contents": 42}', "'contents'"),
        ('{"id": "x9", "contents": "   "}', "'contents'"),
        ('{"id": ["x9"], "contents": "Title\\ntext"}', "'id'"),
        ('{"id": "d01", "contents": "Title\\ntext"}', "'id'"),  # duplicate of line 1
        ('{"id": "x9", "contents": "Title\\ntext"', "JSON"),
        ('["x9", "Title\\ntext"]', "'contents'"),
    ],
)
def test_bad_corpus_line_names_file_line_and_field(tmp_path, bad_line, field):
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    lines.insert(3, bad_line)  # becomes line 4
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(CorpusFormatError) as info:
        load_corpus(path)
    message = str(info.value)
    assert f"{path}:4:" in message
    assert field in message


def test_missing_corpus_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        BM25Search(tmp_path / "nowhere.jsonl")


# ---------------------------------------------------------------------------------------------------------------------
# BM25


@pytest.mark.parametrize(("query", "gold"), BM25_QUERIES)
def test_bm25_ranks_the_gold_passage_first(bm25, query, gold):
    (hits,) = bm25.retrieve([query], top_k=3)
    assert hits[0].id == gold


def test_bm25_retrieve_is_batched(bm25):
    results = bm25.retrieve([q for q, _ in BM25_QUERIES], top_k=2)
    assert [hits[0].id for hits in results] == [gold for _, gold in BM25_QUERIES]
    assert all(len(hits) <= 2 for hits in results)


def test_bm25_search_returns_formatted_documents(bm25):
    result = run(bm25.search("Who founded Brannock Ironworks?", SearchContext(top_k=2)))
    assert not result.meta.failed
    assert result.meta.engine == "bm25"
    assert result.meta.noisy is None
    assert len(result.documents) == 2
    assert result.documents[0] == load_corpus(CORPUS)[2].contents
    assert result.text.startswith("Doc 1: Brannock Ironworks Brannock Ironworks is a shipbuilding company")
    assert "\nDoc 2: " in result.text


def test_bm25_query_without_known_words_gives_no_information(bm25):
    result = run(bm25.search("xylophone quasar", SearchContext()))
    assert result.documents == []
    assert result.text == NO_INFORMATION
    assert not result.meta.failed


def test_bm25_index_is_saved_reloaded_and_rebuilt_when_the_corpus_changes(corpus):
    first = BM25Search(corpus)
    assert first.built
    fingerprint = first.index_dir / "fingerprint.json"
    assert first.index_dir.parent == corpus.parent and fingerprint.is_file()
    saved_at = fingerprint.stat().st_mtime_ns

    second = BM25Search(corpus)
    assert not second.built
    assert fingerprint.stat().st_mtime_ns == saved_at
    assert second.retrieve(["Brannock Ironworks founder"])[0][0].id == "d03"

    with corpus.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"id": "d21", "contents": "Pellucid Lake\nPellucid Lake is home to silver herons."}) + "\n")
    third = BM25Search(corpus)
    assert third.built
    assert third.retrieve(["silver herons"])[0][0].id == "d21"


def test_bm25_index_dir_can_be_chosen(corpus, tmp_path):
    engine = BM25Search(corpus, index_dir=tmp_path / "elsewhere", top_k=2)
    assert (tmp_path / "elsewhere" / "fingerprint.json").is_file()
    assert len(run(engine.search("Brannock", None)).documents) == 2  # no context: the engine's top_k


# ---------------------------------------------------------------------------------------------------------------------
# Dense


def test_encoder_gives_unit_vectors_that_rank_paraphrases_close(encoder):
    vectors = encoder.encode(["a cat sits on the mat", "a kitten is resting on a rug", "stock markets fell today"])
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


@pytest.mark.parametrize(("query", "gold"), DENSE_QUERIES)
def test_dense_ranks_the_gold_passage_first(dense, query, gold):
    (hits,) = dense.retrieve([query], top_k=3)
    assert hits[0].id == gold


def test_dense_search_returns_top_k_documents(dense):
    result = run(dense.search("village known for making clocks", SearchContext(top_k=4)))
    assert not result.meta.failed
    assert result.meta.engine == "dense"
    assert len(result.documents) == 4
    assert result.text.startswith("Doc 1: Nimbleford Nimbleford is a village")


def test_concurrent_dense_searches_all_succeed(dense):
    """Searches run in worker threads; many at once must not trip over the shared tokenizer or model."""

    async def many():
        queries = [q for q, _ in DENSE_QUERIES] * 4
        return await asyncio.gather(*(dense.search(q, SearchContext(top_k=1)) for q in queries))

    results = run(many())
    assert [r.meta.failed for r in results] == [False] * len(results)
    assert [r.documents[0][:10] for r in results[:5]] == [r.documents[0][:10] for r in results[5:10]]


def test_dense_index_is_saved_reloaded_and_rebuilt_when_the_corpus_changes(corpus, encoder):
    first = DenseSearch(corpus, encoder=encoder)
    assert first.built
    index_file = first.index_dir / "index.faiss"
    saved_at = index_file.stat().st_mtime_ns

    second = DenseSearch(corpus, encoder=encoder)
    assert not second.built
    assert index_file.stat().st_mtime_ns == saved_at
    assert second.index.ntotal == 20

    with corpus.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"id": "d21", "contents": "Pellucid Lake\nPellucid Lake is home to silver herons."}) + "\n")
    third = DenseSearch(corpus, encoder=encoder)
    assert third.built
    assert third.index.ntotal == 21
    assert third.retrieve(["a lake where grey-white wading birds live"])[0][0].id == "d21"


# ---------------------------------------------------------------------------------------------------------------------
# Factory


def test_factory_builds_each_kind_and_names_the_choices(corpus, monkeypatch):
    assert isinstance(build_real_engine("bm25", corpus_path=corpus), BM25Search)
    assert isinstance(build_real_engine("http", url="http://127.0.0.1:1/retrieve"), HttpRetriever)
    monkeypatch.setenv("SERPAPI_API_KEY", "k")
    assert isinstance(build_real_engine("serpapi"), SerpApiSearch)
    with pytest.raises(ValueError, match=r"'google'.*'bm25', 'dense', 'http', 'serpapi'"):
        build_real_engine("google")
    with pytest.raises(TypeError, match=r"'bm25'.*corpus"):
        build_real_engine("bm25", corpus=corpus)


# ---------------------------------------------------------------------------------------------------------------------
# Local HTTP servers for the remote engines


class ScriptedServer:
    """A stdlib HTTP server on 127.0.0.1 that answers requests from a script of (status, json body) replies.

    The last reply repeats once the script runs out. Every request is recorded (method, path, query, json body).
    """

    def __init__(self, replies: list[tuple[int, object]]) -> None:
        self.replies = list(replies)
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                server.requests.append(
                    {"method": self.command, "path": url.path, "query": parse_qs(url.query), "json": body}
                )
                status, payload = server.replies.pop(0) if len(server.replies) > 1 else server.replies[0]
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]

    @contextmanager
    def running(self) -> Iterator[ScriptedServer]:
        thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.httpd.shutdown()
            self.httpd.server_close()
            thread.join(timeout=5)


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel's backlog) but never answers: a hung server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------------
# HttpRetriever


def test_http_retriever_dead_port_gives_failed_result():
    engine = HttpRetriever(f"http://127.0.0.1:{free_port()}/retrieve", timeout_s=1.0, retries=2, backoff_s=0.01)
    result = run(engine.search("anything", SearchContext()))
    assert result.meta.failed
    assert result.meta.engine == "http"
    assert result.text == NO_INFORMATION
    assert "3 attempt(s)" in result.meta.error


def test_http_retriever_hung_server_times_out_into_a_failed_result():
    with silent_port() as port:
        engine = HttpRetriever(f"http://127.0.0.1:{port}/retrieve", timeout_s=0.3, retries=1, backoff_s=0.01)
        result = run(engine.search("anything", SearchContext()))
    assert result.meta.failed
    assert "timed out" in result.meta.error


def test_http_retriever_retries_a_5xx_then_reads_zerosearch_wiki_answer():
    server = ScriptedServer([(503, {"error": "warming up"}), (200, [{"text": "Quillmere is a capital."}])])
    with server.running():
        engine = HttpRetriever(f"http://127.0.0.1:{server.port}/retrieve", top_k=3, retries=2, backoff_s=0.01)
        result = run(engine.search("capital of Halvard", SearchContext(top_k=3)))
    assert not result.meta.failed
    assert result.documents == ["Quillmere is a capital."]
    assert len(server.requests) == 2
    assert server.requests[0]["json"] == {"query": "capital of Halvard", "top_k": 3}


def test_http_retriever_does_not_retry_a_client_error():
    server = ScriptedServer([(400, {"detail": "'query' must be a string"})])
    with server.running():
        engine = HttpRetriever(f"http://127.0.0.1:{server.port}/retrieve", retries=3, backoff_s=0.01)
        result = run(engine.search("q", SearchContext()))
    assert result.meta.failed
    assert "HTTP 400" in result.meta.error and "'query' must be a string" in result.meta.error
    assert len(server.requests) == 1


def test_http_retriever_search_r1_request_shape():
    reply = {"result": [[{"document": {"id": "1", "contents": "Serin River\nA long river."}, "score": 3.0}]]}
    server = ScriptedServer([(200, reply)])
    with server.running():
        engine = HttpRetriever(f"http://127.0.0.1:{server.port}/retrieve", request_shape="search-r1")
        result = run(engine.search("river", SearchContext(top_k=2)))
    assert server.requests[0]["json"] == {"queries": ["river"], "topk": 2, "return_scores": False}
    assert result.documents == ["Serin River\nA long river."]
    assert result.text == "Doc 1: Serin River A long river."


def test_http_retriever_unreadable_answer_is_a_failed_result():
    server = ScriptedServer([(200, {"unexpected": True})])
    with server.running():
        result = run(HttpRetriever(f"http://127.0.0.1:{server.port}/retrieve").search("q", SearchContext()))
    assert result.meta.failed
    assert "unexpected /retrieve response" in result.meta.error


@pytest.mark.parametrize(
    "body",
    [
        [{"text": "A"}, {"text": "B"}],
        {"result": [{"id": "1", "contents": "A"}, {"id": "2", "contents": "B"}]},
        {"result": [[{"document": {"contents": "A"}, "score": 2.0}, {"document": {"contents": "B"}, "score": 1.0}]]},
        {"result": [[{"id": "1", "contents": "A"}, {"id": "2", "contents": "B"}]]},
        ["A", "B"],
    ],
)
def test_parse_retrieve_response_reads_every_shape(body):
    assert parse_retrieve_response(body) == ["A", "B"]


def test_http_retriever_rejects_unknown_request_shape():
    with pytest.raises(ValueError, match="request_shape"):
        HttpRetriever("http://127.0.0.1:1/retrieve", request_shape="grpc")


# ---------------------------------------------------------------------------------------------------------------------
# SerpApiSearch

SECRET = "sk-test-0123456789abcdef"
SERP_REPLY = {
    "search_metadata": {"status": "Success"},
    "organic_results": [
        {"position": 1, "title": "Velmora Kettleworth", "snippet": "A glassblower from Ostrelle.", "link": "https://a"},
        {"position": 2, "title": "Ostrelle - Wikipedia", "snippet": "Port town on the Danvik.", "link": "https://b"},
        {"position": 3, "title": "Blue lanterns", "link": "https://c"},
    ],
}


def test_serpapi_formats_title_and_snippet_without_separator(monkeypatch):
    monkeypatch.setenv("SERPAPI_API_KEY", SECRET)
    server = ScriptedServer([(200, SERP_REPLY)])
    with server.running():
        engine = SerpApiSearch(base_url=f"http://127.0.0.1:{server.port}/search")
        result = run(engine.search("Velmora Kettleworth birthplace", SearchContext(top_k=2)))
    assert not result.meta.failed
    assert result.meta.engine == "serpapi"
    assert result.documents == [
        "Velmora KettleworthA glassblower from Ostrelle.",
        "Ostrelle - WikipediaPort town on the Danvik.",
    ]
    assert result.text.splitlines()[0] == "Doc 1: Velmora KettleworthA glassblower from Ostrelle."
    (request,) = server.requests
    assert request["method"] == "GET"
    assert request["query"] == {
        "engine": ["google"],
        "q": ["Velmora Kettleworth birthplace"],
        "num": ["2"],
        "api_key": [SECRET],
    }


def test_serpapi_result_without_snippet_keeps_its_title(monkeypatch):
    monkeypatch.setenv("SERPAPI_API_KEY", SECRET)
    server = ScriptedServer([(200, SERP_REPLY)])
    with server.running():
        result = run(SerpApiSearch(base_url=f"http://127.0.0.1:{server.port}/search").search("q", SearchContext()))
    assert result.documents[2] == "Blue lanterns"


def test_serpapi_no_results_is_empty_not_failed(monkeypatch):
    monkeypatch.setenv("SERPAPI_API_KEY", SECRET)
    server = ScriptedServer([(200, {"error": "Google hasn't returned any results for this query."})])
    with server.running():
        result = run(SerpApiSearch(base_url=f"http://127.0.0.1:{server.port}/search").search("q", SearchContext()))
    assert not result.meta.failed
    assert result.text == NO_INFORMATION


def test_serpapi_missing_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("MY_SERP_KEY", raising=False)
    with pytest.raises(ValueError, match="MY_SERP_KEY"):
        SerpApiSearch(api_key_env="MY_SERP_KEY")


def test_serpapi_key_never_leaks(monkeypatch, caplog):
    """A server that echoes the key back in its error, a dead port, reprs and httpx's request log: no key anywhere."""
    monkeypatch.setenv("SERPAPI_API_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    echo = ScriptedServer([(500, {"error": f"internal error for api_key={SECRET}"})])
    with echo.running():
        engine = SerpApiSearch(base_url=f"http://127.0.0.1:{echo.port}/search", retries=1, backoff_s=0.01)
        failed = run(engine.search("q", SearchContext()))
    dead = SerpApiSearch(base_url=f"http://127.0.0.1:{free_port()}/search", retries=0)
    unreachable = run(dead.search("q", SearchContext()))

    assert failed.meta.failed and unreachable.meta.failed
    assert len(echo.requests) == 2 and echo.requests[0]["query"]["api_key"] == [SECRET]  # the key was really sent
    assert "internal error for api_key=***" in failed.meta.error
    assert "HTTP Request: GET" in caplog.text  # httpx did log the request URL, so the redaction was exercised
    for text in (
        failed.meta.error,
        failed.text,
        repr(failed),
        unreachable.meta.error,
        repr(unreachable),
        repr(engine),
        str(engine),
        caplog.text,
    ):
        assert SECRET not in text


def test_serpapi_engine_survives_pickling_and_still_redacts(monkeypatch, caplog):
    """Ray ships engines to actors by pickle: the used client stays behind, and the copy installs its own log filter."""
    monkeypatch.setenv("SERPAPI_API_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    server = ScriptedServer([(200, SERP_REPLY)])
    with server.running():
        original = SerpApiSearch(base_url=f"http://127.0.0.1:{server.port}/search")
        assert not run(original.search("q", SearchContext())).meta.failed
        copy = pickle.loads(pickle.dumps(original))
        run(original.close())  # removes the original's filter: only the copy's can redact from here on
        caplog.clear()
        result = run(copy.search("q", SearchContext(top_k=1)))
    assert result.documents == ["Velmora KettleworthA glassblower from Ostrelle."]
    assert "HTTP Request: GET" in caplog.text
    assert SECRET not in caplog.text
