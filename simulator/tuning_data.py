"""The simulator's fine-tuning data (spec section 3): what a real engine returned to a policy's queries, labelled
useful or noisy, and written as SFT examples in the SFT-mode template.

The pipeline around it is in ``launch/collect_sim_data.py``; everything here is pure and tested by hand:

- ``SearchRecord``: one search of one episode: the question and its gold answers, the query, the real documents, the
  episode's final answer and whether it was correct.
- Labels, selectable:
  - ``v1`` (the paper): a search from an episode that answered correctly gave useful documents, from a wrong one noisy
    documents (``label_v1``);
  - ``rule`` (v2 with a rule): useful when a document contains a gold answer (``label_rule``);
  - ``llm`` (v2): an LLM judge reads the query, the question and the documents (``judge_prompt``,
    ``parse_judgement``).
- The dataset: duplicates dropped, a deterministic split by question, useful and noisy balanced, and each record as
  ``{"prompt", "completion"}``: the SFT-mode prompt with the label's keyword, and the documents as ``Doc i: ...`` lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from simulator.answers import normalize_answer
from simulator.base import format_documents  # the real engine's <information> text, as the policy reads it
from simulator.templates import build_simulator_prompt

LABEL_RULES = ("v1", "rule", "llm")
USEFUL, NOISY = "useful", "noisy"
SPLITS = ("train", "val")
RECORD_KEYS = ("question", "golden_answers", "query", "documents", "final_answer", "correct")
SFT_KEYS = ("prompt", "completion", "label", "query", "question", "golden_answers")


@dataclass
class SearchRecord:
    """One search call of one episode against a real engine."""

    question: str
    golden_answers: list[str]
    query: str
    documents: list[str]
    final_answer: str | None  # the episode's last <answer>, None when it never answered
    correct: bool  # SubEM of the final answer, the paper's "EM"
    question_id: str = ""
    sample: int = 0  # which of the question's episodes
    turn: int = 0  # which search of the episode
    engine: str = ""
    label: str = ""  # useful | noisy, once labelled
    split: str = ""  # train | val, once split

    @classmethod
    def from_json(cls, row: dict[str, Any], where: str = "record") -> SearchRecord:
        missing = [key for key in RECORD_KEYS if key not in row]
        if missing:
            raise ValueError(f"{where}: missing keys {missing}; a search record has {[f.name for f in fields(cls)]}")
        for key in ("golden_answers", "documents"):
            if not isinstance(row[key], list) or not all(isinstance(x, str) for x in row[key]):
                raise ValueError(f"{where}: {key!r} must be a list of strings, got {row[key]!r:.80}")
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})


# --- labels ------------------------------------------------------------------------------------------------------


def contains_answer(text: str, answers: Iterable[str]) -> bool:
    """Whether a normalized gold answer occurs in the normalized text as a run of whole words."""
    haystack = f" {normalize_answer(text)} "
    return any(f" {needle} " in haystack for needle in (normalize_answer(a) for a in answers) if needle)


def label_v1(record: SearchRecord) -> str:
    """The paper's rule: the trajectory's outcome labels every search in it."""
    return USEFUL if record.correct else NOISY


def label_rule(record: SearchRecord) -> str:
    """v2 as a rule: the documents are useful when one of them contains a gold answer."""
    return USEFUL if any(contains_answer(doc, record.golden_answers) for doc in record.documents) else NOISY


JUDGE_PROMPT = """You are judging search results.
Question: {question}
Correct answer: {answer}
Search query: {query}
Search results:
{documents}

Do these search results contain enough information to answer the question correctly? Reply with one word: yes or no.
"""


def judge_prompt(record: SearchRecord) -> str:
    """The LLM judge's prompt (v2). Ours: the project page describes the judge but not its prompt."""
    return JUDGE_PROMPT.format(question=record.question, answer=" / ".join(record.golden_answers),
                               query=record.query, documents=format_documents(record.documents))


def parse_judgement(text: str | None) -> str | None:
    """``useful`` for a reply whose first word is yes, ``noisy`` for no, None for anything else."""
    words = re.findall(r"[a-z]+", (text or "").lower())
    if not words or words[0] not in ("yes", "no"):
        return None
    return USEFUL if words[0] == "yes" else NOISY


# --- the dataset -------------------------------------------------------------------------------------------------


def split_of(question: str, val_fraction: float) -> str:
    """``val`` for a fixed share of questions, by a hash of the question text alone: the same question falls on the
    same side whatever the order, the seed or the machine."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    digest = hashlib.sha256(question.strip().encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def usable(record: SearchRecord) -> bool:
    return bool(record.query.strip()) and bool(record.documents) and bool(record.golden_answers)


def dedupe(records: Iterable[SearchRecord]) -> list[SearchRecord]:
    """The first record of each (question, query, label): sampled episodes often repeat a query. The same query may
    keep both labels under v1 (one episode right, one wrong), as in the paper."""
    seen, kept = set(), []
    for r in records:
        key = (r.question, " ".join(r.query.lower().split()), r.label)
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept


def balance(records: Sequence[SearchRecord], seed: int = 0) -> list[SearchRecord]:
    """Each split with as many useful as noisy records: a seeded sample of the larger class, order kept."""
    kept = []
    for split in SPLITS:
        by_label = {label: [r for r in records if r.split == split and r.label == label] for label in (USEFUL, NOISY)}
        n = min(len(v) for v in by_label.values())
        rng = random.Random(f"{seed}:{split}")
        chosen = {id(r) for group in by_label.values() for r in rng.sample(group, n)}
        kept += [r for r in records if id(r) in chosen]
    return kept


def sft_example(record: SearchRecord) -> dict[str, Any]:
    """The SFT-mode prompt with the label's keyword (question and first gold answer in it), and the documents."""
    if record.label not in (USEFUL, NOISY):
        raise ValueError(f"record for query {record.query!r} is not labelled (label={record.label!r})")
    prompt = build_simulator_prompt(record.query, record.question, record.golden_answers[0],
                                    useful=record.label == USEFUL, mode="sft")
    return {"prompt": prompt, "completion": format_documents(record.documents), "label": record.label,
            "query": record.query, "question": record.question, "golden_answers": list(record.golden_answers)}


def label_counts(records: Iterable[SearchRecord]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {split: {USEFUL: 0, NOISY: 0} for split in SPLITS}
    for r in records:
        counts[r.split][r.label] += 1
    return counts


# --- files -------------------------------------------------------------------------------------------------------


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> Path:
    """All rows or none: written beside the target, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [row for _, row in numbered_rows(path)]


def numbered_rows(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """The JSON objects of a jsonl file with their line numbers (blank lines skipped), for errors that name a line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    return rows


def read_records(path: str | os.PathLike) -> list[SearchRecord]:
    return [SearchRecord.from_json(row, f"{path}, line {lineno}") for lineno, row in numbered_rows(path)]


def read_sft_examples(path: str | os.PathLike) -> list[dict[str, Any]]:
    """SFT examples, each checked for every key (``SFT_KEYS``) with the right type, and for a known label."""
    numbered = numbered_rows(path)
    if not numbered:
        raise ValueError(f"{path}: no examples")
    for lineno, row in numbered:
        missing = [k for k in SFT_KEYS if k not in row]
        if missing:
            raise ValueError(f"{path}, line {lineno}: missing keys {missing}; expected {list(SFT_KEYS)}")
        if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str) or not row["completion"]:
            raise ValueError(f"{path}, line {lineno}: 'prompt' and 'completion' must be non-empty strings")
        if row["label"] not in (USEFUL, NOISY):
            raise ValueError(f"{path}, line {lineno}: label {row['label']!r}; expected {USEFUL!r} or {NOISY!r}")
    return [row for _, row in numbered]


def record_rows(records: Iterable[SearchRecord]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]

