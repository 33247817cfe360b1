"""Where each benchmark's questions come from, by name (spec section 8).

Under a data folder, a benchmark ``NAME`` is read from the first of these that exists:

    NAME/test.jsonl, NAME/dev.jsonl, NAME/train.jsonl     FlashRAG's layout; the paper's split rule: test, else dev,
                                                          else train
    NAME.jsonl                                            one FlashRAG-style file
    test.parquet, rows whose data_source is NAME          the released ZeroSearch test set

``synthetic`` names the synthetic world's test split (``test.parquet``, both hop counts). A name that matches nothing
raises ``BenchmarkNotFound`` listing every path that was tried.
"""

from __future__ import annotations

from pathlib import Path

from actors.dataset import QAExample, load_qa
from actors.evaluation import BENCHMARKS

SPLITS = ("test", "dev", "train")
SYNTHETIC = "synthetic"


class BenchmarkNotFound(FileNotFoundError):
    """No file under the data folder holds the benchmark."""


def benchmark_examples(data_dir: str | Path, name: str, limit: int | None = None) -> list[QAExample]:
    """The benchmark's questions, the first ``limit`` of them (in file order, so every method sees the same ones)."""
    data_dir = Path(data_dir)
    if name not in (*BENCHMARKS, SYNTHETIC):
        raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join((*BENCHMARKS, SYNTHETIC))}")
    tried: list[str] = []
    examples = None
    if name == SYNTHETIC:
        path = data_dir / "test.parquet"
        tried.append(str(path))
        if path.is_file():
            examples = [e for e in load_qa(path) if e.data_source.startswith(SYNTHETIC)]
    else:
        for path in [data_dir / name / f"{split}.jsonl" for split in SPLITS] + [data_dir / f"{name}.jsonl"]:
            tried.append(str(path))
            if path.is_file():
                examples = load_qa(path, data_source=name)
                break
        if examples is None:
            path = data_dir / "test.parquet"
            tried.append(f"{path} (rows with data_source == {name!r})")
            if path.is_file():
                examples = [e for e in load_qa(path) if e.data_source == name] or None
    if not examples:
        raise BenchmarkNotFound(f"benchmark {name!r}: no questions found; looked for " + ", ".join(tried))
    return [_relabel(e, name) for e in examples[:limit]]


def _relabel(example: QAExample, name: str) -> QAExample:
    """Every question of a benchmark reports under the benchmark's name (the synthetic world has two sources)."""
    if example.data_source == name:
        return example
    return QAExample(example.uid, example.question, example.golden_answers, name, example.split, example.index)
