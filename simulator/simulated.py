"""The simulated search engine (spec section 2): an LLM writes the search results, useful or noisy.

- ``SimulatedSearch`` calls our simulator pool (``simulator/pool_actor.py``), a Ray actor shared by every rollout actor.
- ``OpenAISimulator`` calls external OpenAI-compatible servers (sglang, vLLM, ``launch/serve_simulator.py``), the way
  the original code did, but with a timeout, bounded retries and a fallback instead of retrying forever.
- ``build_search_engine`` turns a ``SearchConfig`` into any engine, real or simulated.

Both simulators share the per-call logic (``SimulatorEngineBase``): draw useful vs noisy with the episode's noise
probability from an RNG seeded by ``(ctx.seed, query)``, so a run's draws are reproducible and independent of which
searches happened to run first; build the prompt from the episode's own question and first gold answer (the original
mixed them up across samples once some had stopped searching); parse the reply into at most ``top_k`` documents;
report an empty reply as a failed search whose text is "No information available".
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Hashable
from typing import Any

from simulator.base import NO_INFORMATION, SearchContext, SearchEngine, SearchMeta, SearchResult
from simulator.config import SearchConfig, SimulatorConfig
from simulator.templates import MODES, build_simulator_prompt, parse_simulator_output

logger = logging.getLogger(__name__)

OPENAI_DEFAULT_PORT = 6001  # the port the original client hard-codes


def draw_useful(ctx: SearchContext, query: str) -> bool:
    """The spec's draw: ``u ~ U[0,1)``, useful when ``u > noise_prob``, noisy otherwise.

    With a seed, ``u`` comes from a private RNG seeded by a hash of ``(seed, query)``, so the same episode seed and
    query always draw the same way (callers give each episode, or each turn, its own seed). Without one, fresh
    randomness is used.
    """
    if ctx.seed is None:
        u = random.random()
    else:
        digest = hashlib.sha256(f"{ctx.seed}\x00{query}".encode()).digest()
        u = random.Random(int.from_bytes(digest[:8], "big")).random()
    return u > ctx.noise_prob


class SimulatorEngineBase(SearchEngine):
    """What both simulators share; subclasses implement ``_complete(prompt, cache_key) -> dict``.

    ``_complete`` returns ``{"text", "num_tokens", "failed", "error", "cache_hit"}`` and must never hang.
    """

    name = "simulated"

    def __init__(self, mode: str = "prompt", top_k: int = 5) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown simulator mode {mode!r}; choose one of {list(MODES)}")
        self.mode = mode
        self.top_k = top_k
        self.last_prompt = ""  # the most recent prompt, for debugging and data collection

    async def _complete(self, prompt: str, cache_key: Hashable) -> dict[str, Any]:
        raise NotImplementedError

    async def search(self, query: str, ctx: SearchContext | None = None) -> SearchResult:
        ctx = ctx or SearchContext()
        start = time.perf_counter()
        useful = draw_useful(ctx, query)
        answer = ctx.golden_answers[0] if ctx.golden_answers else ""
        prompt = build_simulator_prompt(query, ctx.question, answer, useful=useful, mode=self.mode)
        self.last_prompt = prompt
        top_k = ctx.top_k if ctx.top_k > 0 else self.top_k
        reply = await self._complete(prompt, (query, useful, ctx.question, answer))

        meta = SearchMeta(engine=self.name, noisy=not useful, cache_hit=bool(reply.get("cache_hit")),
                          num_tokens=int(reply.get("num_tokens", 0)), error=str(reply.get("error", "")))
        documents = [] if reply.get("failed") else parse_simulator_output(reply.get("text"), top_k)
        if not documents:
            meta.failed = True
            meta.error = meta.error or "the simulator returned no documents"
        meta.latency_s = time.perf_counter() - start
        return SearchResult(documents=documents, meta=meta, text="" if documents else NO_INFORMATION)


class SimulatedSearch(SimulatorEngineBase):
    """Search results written by our simulator pool.

    ``pool`` is the ``SimulatorPoolActor`` handle (see ``create_simulator_pool``), or, in unit tests, any object with
    an async ``generate(prompt, cache_key)``. The pool already bounds each attempt and retries; ``timeout_s`` bounds
    the whole call to the pool actor as well, so a lost pool actor cannot stall a rollout either.
    """

    name = "simulated"

    def __init__(self, pool: Any, mode: str = "prompt", top_k: int = 5, timeout_s: float = 400.0) -> None:
        super().__init__(mode, top_k)
        self.pool = pool
        self.timeout_s = timeout_s

    async def _complete(self, prompt: str, cache_key: Hashable) -> dict[str, Any]:
        generate = self.pool.generate
        call = generate.remote(prompt, cache_key) if hasattr(generate, "remote") else generate(prompt, cache_key)
        try:
            return await asyncio.wait_for(_await(call), self.timeout_s)
        except asyncio.TimeoutError:
            return {"failed": True, "error": f"simulator pool did not answer within {self.timeout_s:g}s"}
        except Exception as e:  # noqa: BLE001 - a dead pool actor must not kill the rollout
            logger.warning("simulator pool call failed: %s", e)
            return {"failed": True, "error": f"{type(e).__name__}: {str(e)[:300]}"}

    def __repr__(self) -> str:
        return f"SimulatedSearch(mode={self.mode!r}, top_k={self.top_k}, timeout_s={self.timeout_s})"


async def _await(value: Any) -> Any:
    return await value


def normalize_openai_url(url: str) -> str:
    """``10.0.0.1`` -> ``http://10.0.0.1:6001/v1``: the original listed bare IPs and hard-coded port 6001."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    scheme, rest = url.split("://", 1)
    host, _, path = rest.partition("/")
    if ":" not in host.rsplit("]", 1)[-1]:
        host = f"{host}:{OPENAI_DEFAULT_PORT}"
    return f"{scheme}://{host}/{path or 'v1'}"


class OpenAISimulator(SimulatorEngineBase):
    """Search results written by external OpenAI-compatible chat servers (sglang, vLLM, ``serve_simulator``).

    The request is the original's: ``model`` (``''`` unless configured), an empty system message, the prompt as a
    list holding one text part, ``max_tokens`` 600 and ``temperature`` 0.8. Each attempt picks a random URL (another
    one than the last when there are several) and is bounded by ``timeout_s``; after ``retries`` more failed
    attempts the search returns the fallback. The original retried forever, which stalled training (issue #24).
    """

    name = "openai"

    def __init__(
        self,
        urls: list[str] | str,
        model: str = "",
        mode: str = "prompt",
        top_k: int = 5,
        temperature: float = 0.8,
        max_tokens: int = 600,
        timeout_s: float = 120.0,
        retries: int = 2,
        backoff_s: float = 0.5,
        seed: int | None = None,
    ) -> None:
        super().__init__(mode, top_k)
        urls = [u for u in (urls.split(",") if isinstance(urls, str) else urls) if u.strip()]
        if not urls:
            raise ValueError("OpenAISimulator needs at least one server URL")
        if timeout_s <= 0 or retries < 0:
            raise ValueError("OpenAISimulator: timeout_s must be > 0 and retries >= 0")
        self.urls = [normalize_openai_url(u) for u in urls]
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._rng = random.Random(seed)
        self._clients: dict[str, Any] = {}
        self._clients_loop: asyncio.AbstractEventLoop | None = None

    def _client(self, url: str) -> Any:
        """One ``AsyncOpenAI`` per URL and event loop (its connection pool belongs to the loop that opened it)."""
        from openai import AsyncOpenAI

        loop = asyncio.get_running_loop()
        if self._clients_loop is not loop:
            self._clients, self._clients_loop = {}, loop
        if url not in self._clients:
            self._clients[url] = AsyncOpenAI(base_url=url, api_key="EMPTY", timeout=self.timeout_s, max_retries=0)
        return self._clients[url]

    def request(self, prompt: str) -> dict[str, Any]:
        """The keyword arguments of ``chat.completions.create``, as the original client sends them."""
        return {
            "model": self.model,
            "messages": [
                {"role": "system", "content": ""},
                {"role": "user", "content": [{"type": "text", "text": prompt}]},
            ],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }

    async def _complete(self, prompt: str, cache_key: Hashable) -> dict[str, Any]:
        errors: list[str] = []
        last_url = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            choices = [u for u in self.urls if u != last_url] or self.urls
            url = last_url = self._rng.choice(choices)
            try:
                response = await asyncio.wait_for(
                    self._client(url).chat.completions.create(**self.request(prompt)), self.timeout_s
                )
                text = response.choices[0].message.content or ""
                tokens = response.usage.completion_tokens if response.usage else 0
                return {"text": text, "num_tokens": tokens, "failed": False, "error": ""}
            except asyncio.TimeoutError:
                errors.append(f"{url}: timed out after {self.timeout_s:g}s")
            except Exception as e:  # noqa: BLE001 - connection errors, HTTP errors, malformed replies
                errors.append(f"{url}: {type(e).__name__}: {str(e)[:200]}")
        logger.warning("openai simulator failed after %d attempt(s): %s", len(errors), "; ".join(errors))
        return {"failed": True, "error": "; ".join(errors)}

    def __getstate__(self) -> dict[str, Any]:
        """Engines travel to Ray actors by pickle; clients stay behind and are made anew there."""
        return {**self.__dict__, "_clients": {}, "_clients_loop": None}

    async def close(self) -> None:
        clients, self._clients, self._clients_loop = list(self._clients.values()), {}, None
        for client in clients:
            try:
                await client.close()
            except RuntimeError:  # the loop that owned it is gone
                pass

    def __repr__(self) -> str:
        return f"OpenAISimulator(urls={self.urls!r}, model={self.model!r}, mode={self.mode!r}, top_k={self.top_k})"


def build_search_engine(
    search_cfg: SearchConfig,
    sim_cfg: SimulatorConfig | None = None,
    pool: Any = None,
    corpus_path: str | None = None,
) -> SearchEngine:
    """The engine ``search_cfg.engine`` names.

    - ``simulated``: over ``pool`` (a ``SimulatorPoolActor`` handle); without one, a pool is started from ``sim_cfg``
      (which needs a running Ray).
    - ``openai``: ``OpenAISimulator`` over ``search_cfg.openai_urls``, with the prompt mode and sampling of
      ``sim_cfg``.
    - ``bm25``, ``dense``, ``http``, ``serpapi``: ``simulator.engines.build_real_engine``. ``corpus_path`` is the
      data config's corpus, used when ``search_cfg.corpus_file`` is empty.
    """
    sim_cfg = sim_cfg or SimulatorConfig()
    kind = search_cfg.engine
    if kind == "simulated":
        if pool is None:
            from simulator.pool_actor import create_simulator_pool

            pool = create_simulator_pool(sim_cfg)
        return SimulatedSearch(pool, mode=sim_cfg.mode, top_k=search_cfg.top_k, timeout_s=search_cfg.timeout_s)
    if kind == "openai":
        return OpenAISimulator(
            search_cfg.openai_urls, model=search_cfg.openai_model, mode=sim_cfg.mode, top_k=search_cfg.top_k,
            temperature=sim_cfg.temperature, max_tokens=sim_cfg.max_tokens, timeout_s=search_cfg.timeout_s,
            retries=search_cfg.retries, seed=sim_cfg.seed,
        )

    from simulator.engines import build_real_engine

    if kind in ("bm25", "dense"):
        corpus = search_cfg.corpus_file or corpus_path
        if not corpus:
            raise ValueError(f"search engine {kind!r} needs search.corpus_file (or the data config's corpus)")
        kwargs: dict[str, Any] = {"corpus_path": corpus, "top_k": search_cfg.top_k}
        if search_cfg.index_dir:
            kwargs["index_dir"] = search_cfg.index_dir
        return build_real_engine(kind, **kwargs)
    if kind == "http":
        return build_real_engine("http", url=search_cfg.url, top_k=search_cfg.top_k, timeout_s=search_cfg.timeout_s,
                                 retries=search_cfg.retries, request_shape=search_cfg.request_shape)
    if kind == "serpapi":
        return build_real_engine("serpapi", api_key_env=search_cfg.api_key_env, top_k=search_cfg.top_k,
                                 timeout_s=search_cfg.timeout_s, retries=search_cfg.retries)
    raise ValueError(f"unknown search engine {kind!r}")
