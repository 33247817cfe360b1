"""Serve a local corpus over HTTP: `POST /retrieve` and `GET /health`.

    python -m launch.serve_retriever --corpus data/synthetic/corpus.jsonl --port 6002 [--engine bm25|dense]

This stands in for the Wikipedia retrieval servers of ZeroSearch and Search-R1, so that evaluation, data collection
and other machines reach the real engine the same way the original code does (`HttpRetriever` is the client).
`POST /retrieve` accepts both request shapes:

- ZeroSearch (one query): `{"query": "...", "top_k": 5}`
  -> `{"result": [{"id", "title", "text", "contents", "score"}, ...]}`
- Search-R1 (a batch): `{"queries": ["...", ...], "topk": 5, "return_scores": true}`
  -> `{"result": [[{"document": {"id", "title", "text", "contents"}, "score": s}, ...], ...]}`,
  or `{"result": [[{"id", "title", "text", "contents"}, ...], ...]}` when `return_scores` is false.

`top_k` and `topk` are accepted in either shape. A malformed body gets a 400 whose `detail` names the bad key.
The server binds 127.0.0.1 unless `--host` says otherwise. With `--port 0` it picks a free port; the first line it
prints is always `serve_retriever: listening on http://HOST:PORT`, once the index is loaded and the socket is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from launch.listen import listen
from simulator.engines import BM25Search, CorpusDoc, DenseSearch, LocalIndexSearch, ScoredDoc

LOCAL_ENGINES = {"bm25": BM25Search, "dense": DenseSearch}
MAX_TOP_K = 100
MAX_QUERIES = 1024


class BadRequest(ValueError):
    """A request body the server cannot serve; the message goes back to the client with status 400."""


def parse_retrieve_request(body: Any, default_top_k: int) -> tuple[list[str], int, bool, bool]:
    """Validate a `/retrieve` body. Returns (queries, top_k, is_batch, return_scores)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object with 'query' (a string) or 'queries' (a list)")
    if "queries" in body:
        queries = body["queries"]
        if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
            raise BadRequest("'queries' must be a list of strings")
        if len(queries) > MAX_QUERIES:
            raise BadRequest(f"'queries' holds {len(queries)} queries; send at most {MAX_QUERIES} per request")
        is_batch = True
    elif "query" in body:
        if not isinstance(body["query"], str):
            raise BadRequest("'query' must be a string")
        queries, is_batch = [body["query"]], False
    else:
        raise BadRequest("the request body needs 'query' (a string) or 'queries' (a list of strings)")

    top_k_key = "topk" if "topk" in body else "top_k"
    top_k = body.get(top_k_key, default_top_k)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise BadRequest(f"'{top_k_key}' must be an integer from 1 to {MAX_TOP_K}, got {top_k!r}")
    return_scores = body.get("return_scores", False)
    if not isinstance(return_scores, bool):
        raise BadRequest(f"'return_scores' must be true or false, got {return_scores!r}")
    return queries, top_k, is_batch, return_scores


def _doc_json(doc: CorpusDoc) -> dict[str, str]:
    return {"id": doc.id, "title": doc.title, "text": doc.text, "contents": doc.contents}


def format_retrieve_response(hits: list[list[ScoredDoc]], is_batch: bool, return_scores: bool) -> dict[str, Any]:
    """The answer in the shape the request came in (see the module docstring)."""
    if not is_batch:
        return {"result": [{**_doc_json(hit.doc), "score": hit.score} for hit in hits[0]]}
    if return_scores:
        return {"result": [[{"document": _doc_json(h.doc), "score": h.score} for h in row] for row in hits]}
    return {"result": [[_doc_json(h.doc) for h in row] for row in hits]}


def create_app(engine: LocalIndexSearch) -> FastAPI:
    """The FastAPI app around a loaded engine. Retrieval runs in a worker thread, off the server's event loop."""
    app = FastAPI(title="zerosearch-ray retriever")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "engine": engine.name, "num_docs": len(engine.docs), "top_k": engine.top_k}

    @app.post("/retrieve")
    async def retrieve(request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"detail": "the request body is not valid JSON"}, status_code=400)
        try:
            queries, top_k, is_batch, return_scores = parse_retrieve_request(body, engine.top_k)
        except BadRequest as e:
            return JSONResponse({"detail": str(e)}, status_code=400)
        hits = await asyncio.to_thread(engine.retrieve_scored, queries, top_k)
        return format_retrieve_response(hits, is_batch, return_scores)

    return app


def build_local_engine(kind: str, corpus: str, index_dir: str | None, top_k: int) -> LocalIndexSearch:
    if kind not in LOCAL_ENGINES:
        raise ValueError(f"unknown engine {kind!r}; choose from {sorted(LOCAL_ENGINES)}")
    return LOCAL_ENGINES[kind](corpus, index_dir=index_dir, top_k=top_k)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a jsonl corpus over HTTP: POST /retrieve, GET /health.")
    parser.add_argument("--corpus", required=True, help="jsonl corpus, one {'id', 'contents'} object per line")
    parser.add_argument("--port", type=int, default=6002, help="0 picks a free port (default: 6002, ZeroSearch's)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--engine", choices=sorted(LOCAL_ENGINES), default="bm25")
    parser.add_argument("--top-k", type=int, default=5, help="documents per query when the request gives none")
    parser.add_argument("--index-dir", default=None, help="where the index is saved (default: beside the corpus)")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    sock = listen(args.host, args.port, "serve_retriever")  # before the index is built: a busy port fails at once
    engine = build_local_engine(args.engine, args.corpus, args.index_dir, args.top_k)
    host, port = sock.getsockname()[:2]
    print(f"serve_retriever: listening on http://{host}:{port} ({engine!r})", flush=True)
    config = uvicorn.Config(create_app(engine), log_level=args.log_level, access_log=args.log_level == "debug")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
