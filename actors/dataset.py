"""Question-answer datasets: one ``QAExample`` type over the formats the field uses.

- ZeroSearch / Search-R1 parquet (``train.parquet``, ``test.parquet``): ``question``, ``golden_answers`` (or
  ``reward_model.ground_truth.target``), ``data_source``, ``extra_info.index``. The synthetic world writes the same
  schema plus ``extra_info.uid``.
- FlashRAG jsonl: one object per line with ``id``, ``question``, ``golden_answers``.

Every example gets a ``uid`` that is unique across sources. GRPO groups are keyed by it: the original keyed them by
``extra_info.index``, which repeats across sources and silently merged different prompts into one group.

A malformed row raises ``DatasetError`` naming the file, the row and the field.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.protocol import build_prompt_messages


class DatasetError(ValueError):
    """A dataset file or row is not in the expected shape."""


@dataclass(frozen=True)
class QAExample:
    uid: str
    question: str
    golden_answers: tuple[str, ...]
    data_source: str
    split: str = ""
    index: int = 0

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """The paper's policy prompt as a chat message list; the chat template is applied by the rollout side."""
        return build_prompt_messages(self.question)


def load_qa(path: str | Path, data_source: str | None = None) -> list[QAExample]:
    """Load a QA file of any supported format, chosen by its suffix."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    if path.suffix == ".parquet":
        return load_parquet(path)
    if path.suffix in (".jsonl", ".json"):
        return load_flashrag_jsonl(path, data_source=data_source)
    raise DatasetError(f"{path}: unsupported format {path.suffix!r}; expected .parquet or .jsonl")


def load_parquet(path: str | Path) -> list[QAExample]:
    """ZeroSearch / Search-R1 / synthetic parquet."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:
        raise DatasetError(f"{path}: not a readable parquet file ({err})") from err
    examples = []
    for row_number, row in enumerate(rows):
        where = f"{path}: row {row_number}"
        question = _require_str(row, "question", where)
        answers = row.get("golden_answers")
        if answers is None:
            answers = _dig(row, ("reward_model", "ground_truth", "target"))
            field = "reward_model.ground_truth.target"
        else:
            field = "golden_answers"
        if answers is None:
            raise DatasetError(f"{where}: missing field 'golden_answers' (or Search-R1's "
                               f"'reward_model.ground_truth.target'): expected a list of answer strings")
        golds = _require_answers(answers, field, where)
        data_source = _require_str(row, "data_source", where)
        extra = row.get("extra_info") or {}
        if not isinstance(extra, dict):
            raise DatasetError(f"{where}: field 'extra_info': expected a mapping, got {type(extra).__name__}")
        split = str(extra.get("split") or path.stem)
        index = extra.get("index", row_number)
        if not isinstance(index, int):
            raise DatasetError(f"{where}: field 'extra_info.index': expected an integer, got {index!r}")
        uid = extra.get("uid") or f"{data_source}/{split}/{index}"
        examples.append(QAExample(str(uid), question, golds, data_source, split, index))
    return _with_unique_uids(examples)


def load_flashrag_jsonl(path: str | Path, data_source: str | None = None) -> list[QAExample]:
    """FlashRAG-style jsonl. The data source defaults to the folder name (FlashRAG ships ``nq/test.jsonl``)."""
    path = Path(path)
    source = data_source or path.parent.name or path.stem
    split = path.stem
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}: row {line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{where}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
            question = _require_str(row, "question", where)
            golds = _require_answers(row.get("golden_answers"), "golden_answers", where)
            row_id = row.get("id", line_number - 1)
            if not isinstance(row_id, (str, int)):
                raise DatasetError(f"{where}: field 'id': expected a string or integer, got {type(row_id).__name__}")
            examples.append(QAExample(f"{source}/{split}/{row_id}", question, golds, source, split, line_number - 1))
    return _with_unique_uids(examples)


def _require_str(row: dict[str, Any], field: str, where: str) -> str:
    if field not in row or row[field] is None:
        raise DatasetError(f"{where}: missing field '{field}'")
    value = row[field]
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: field '{field}': expected a non-empty string, got {value!r}")
    return value


def _require_answers(value: Any, field: str, where: str) -> tuple[str, ...]:
    if value is None:
        raise DatasetError(f"{where}: missing field '{field}'")
    if isinstance(value, str) or not isinstance(value, Sequence) and not hasattr(value, "tolist"):
        raise DatasetError(f"{where}: field '{field}': expected a list of strings, got {type(value).__name__}")
    answers = list(value.tolist() if hasattr(value, "tolist") else value)
    if not answers:
        raise DatasetError(f"{where}: field '{field}': the answer list is empty")
    for answer in answers:
        if not isinstance(answer, str) or not answer.strip():
            raise DatasetError(f"{where}: field '{field}': expected non-empty strings, got {answer!r}")
    return tuple(answers)


def _dig(row: dict[str, Any], keys: tuple[str, ...]) -> Any:
    value: Any = row
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _with_unique_uids(examples: list[QAExample]) -> list[QAExample]:
    """Keep uids unique within a file even when a source repeats an index: a shared uid would merge two GRPO
    groups."""
    seen: dict[str, int] = {}
    out = []
    for example in examples:
        count = seen.get(example.uid, 0)
        seen[example.uid] = count + 1
        if count:
            example = QAExample(f"{example.uid}#{count}", example.question, example.golden_answers,
                                example.data_source, example.split, example.index)
        out.append(example)
    return out
