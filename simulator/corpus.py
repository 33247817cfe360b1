"""The corpus the local engines search, and the saved indexes they build over it.

A corpus is jsonl, one document a line: `{"id": ..., "contents": "Title\\ntext"}`, the shape of the common Wikipedia
corpora. An index is saved next to the corpus with a fingerprint of the corpus file and the engine's settings, and
reloaded while both are unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from simulator.base import json_kind

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


def check_corpus(path: str | os.PathLike, lines: int = 1000) -> None:
    """Fail now, naming the file and line, when the corpus is missing, empty, or its first ``lines`` lines are not
    documents: a run checks its corpus before any engine loads it in an actor, without reading a 20M-line file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    seen = 0
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                _parse_corpus_line(line, path, lineno)
                seen += 1
            if seen >= lines:
                break
    if not seen:
        raise CorpusFormatError(f"{path}: the corpus has no documents")


def _parse_corpus_line(line: str, path: Path, lineno: int) -> CorpusDoc:
    where = f"{path}:{lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise CorpusFormatError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise CorpusFormatError(f"{where}: expected a JSON object with fields 'id' and 'contents', "
                                f"got {json_kind(row)}")

    if "id" not in row:
        raise CorpusFormatError(f"{where}: field 'id' is missing")
    doc_id = row["id"]
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise CorpusFormatError(f"{where}: field 'id' must be a string or an integer, got {json_kind(doc_id)}")

    if "contents" in row:
        contents = row["contents"]
        if not isinstance(contents, str):
            raise CorpusFormatError(f"{where}: field 'contents' must be a string, got {json_kind(contents)}")
        title, _, text = contents.partition("\n")
    elif "text" in row:  # DPR shape: separate title and text
        title, text = row.get("title", ""), row["text"]
        for field_name, value in (("title", title), ("text", text)):
            if not isinstance(value, str):
                raise CorpusFormatError(f"{where}: field '{field_name}' must be a string, got {json_kind(value)}")
        contents = f"{title}\n{text}" if title else text
    else:
        raise CorpusFormatError(f"{where}: field 'contents' is missing")
    if not contents.strip():
        raise CorpusFormatError(f"{where}: field 'contents' is empty")
    return CorpusDoc(id=str(doc_id), title=title.strip(), text=text.strip(), contents=contents)


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
