"""The contract every search engine keeps: ``async search(query, ctx) -> SearchResult``.

The policy never learns which engine answered. Real engines (BM25, dense, HTTP, SerpAPI) and the simulated one all
return the same shape, so the rollout code, evaluation and data collection are written once against this file.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

NO_INFORMATION = "No information available"


@dataclass(frozen=True)
class SearchContext:
    """What the engine may know about the episode behind a query.

    Real engines look only at the query. The simulator also reads the episode's own question and gold answers (the
    original passed another sample's by mistake once some samples had stopped searching) and the curriculum's noise
    probability.
    """

    question: str = ""
    golden_answers: tuple[str, ...] = ()
    noise_prob: float = 0.0
    seed: int | None = None
    top_k: int = 0  # documents wanted; 0: the engine's own (``search.top_k``)


@dataclass
class SearchMeta:
    engine: str
    noisy: bool | None = None  # None for real engines: they do not choose to mislead
    cache_hit: bool = False
    failed: bool = False
    latency_s: float = 0.0
    num_tokens: int = 0  # tokens the simulator generated; 0 for real engines
    error: str = ""


@dataclass
class SearchResult:
    documents: list[str]
    meta: SearchMeta
    text: str = field(default="")

    def __post_init__(self) -> None:
        if not self.text:
            self.text = format_documents(self.documents)


def format_documents(documents: list[str]) -> str:
    """``Doc 1: ...\\nDoc 2: ...``, the layout the paper's engines and simulators share.

    Newlines inside a document are flattened so that one line is one document, which is what the simulator
    post-processing and the ``Doc k`` cut-off rely on.
    """
    if not documents:
        return NO_INFORMATION
    return "\n".join(f"Doc {i}: {' '.join(doc.split())}" for i, doc in enumerate(documents, start=1))


def failed_result(engine: str, error: str, latency_s: float = 0.0) -> SearchResult:
    """The answer to a search that could not be served: the policy reads the spec's fallback text, never a hang."""
    return SearchResult(
        documents=[],
        text=NO_INFORMATION,
        meta=SearchMeta(engine=engine, failed=True, latency_s=latency_s, error=error),
    )


class SearchEngine(abc.ABC):
    """A search engine the policy can call. Implementations must bound every remote call with a timeout."""

    name: str = "engine"

    @abc.abstractmethod
    async def search(self, query: str, ctx: SearchContext) -> SearchResult: ...

    async def close(self) -> None:
        """Release sockets, actors or files. Engines that hold nothing need not override it."""
        return None


def resolve_top_k(ctx: SearchContext | None, default: int) -> int:
    """The episode's `ctx.top_k` decides how many documents a search returns; without a context, the engine's own."""
    return ctx.top_k if ctx is not None and ctx.top_k > 0 else default


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, for error messages: ``null``, ``dict``, ``list``, ``str``..."""
    return "null" if value is None else type(value).__name__
