"""Remote search engines: a `/retrieve` server and Google through SerpAPI.

`HttpRetriever` calls a `/retrieve` server (ours in `launch/serve_retriever.py`, ZeroSearch's wiki server, or
Search-R1's), and `SerpApiSearch` calls SerpAPI. `search` never raises and never hangs: every call carries a timeout
and a bounded number of retries, and whatever cannot be served becomes `failed_result(...)`, whose text is the spec's
"No information available".
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from simulator.base import (
    SearchContext,
    SearchEngine,
    SearchMeta,
    SearchResult,
    failed_result,
    json_kind,
    resolve_top_k,
)

logger = logging.getLogger(__name__)


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
        top_k = resolve_top_k(ctx, self.top_k)
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
            f"unexpected /retrieve response: expected a list of hits or {{'result': [...]}}, got {json_kind(body)}"
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
        top_k = resolve_top_k(ctx, self.top_k)
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
            raise _RequestFailed(f"unexpected SerpAPI response: expected a JSON object, got {json_kind(body)}")
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
