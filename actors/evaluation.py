"""Scoring evaluation answers and tabulating them as the paper does (spec sections 5 and 9).

One ``EvalRecord`` per question and method; ``summarize`` turns a method's records into per-dataset metrics plus the
paper's "Avg" column (the unweighted mean over datasets, so a 125-question Bamboogle weighs as much as a 500-question
NQ), and ``markdown_table`` lays methods out as rows and datasets as columns, in the paper's order.

Metrics, in percent as the paper prints them:
    em            strict exact match after normalisation (Search-R1's EM)
    subem         a normalised gold answer occurs in the normalised prediction: the paper's "EM"
    f1            token F1, best over the gold answers (the training reward)
    searches      searches per question
    tokens        tokens the model generated per question
    invalid_rate  share of the model's turns that were neither a parsable search nor an answer
A question without an ``<answer>`` scores 0 on the three answer metrics.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from actors.reward import exact_match, extract_answer, f1_score, substring_match

# The paper's benchmark order (spec section 8).
BENCHMARKS = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
ANSWER_METRICS = ("em", "subem", "f1")
METRIC_NAMES = (*ANSWER_METRICS, "searches", "tokens", "invalid_rate")


@dataclass
class EvalRecord:
    """One question answered by one method."""

    dataset: str
    uid: str
    question: str
    golden_answers: tuple[str, ...]
    prediction: str | None  # the text inside the last <answer>, None when there was none
    searches: int = 0
    generated_tokens: int = 0
    turns: int = 1
    invalid_actions: int = 0
    response: str = ""

    @classmethod
    def from_trajectory(cls, dataset: str, question: str, trajectory) -> EvalRecord:
        """An agent episode (``actors.trajectory.Trajectory``) as a record: its answer and its episode statistics."""
        stats = trajectory.stats
        return cls(dataset, trajectory.group_id, question, tuple(trajectory.golden_answers),
                   extract_answer(trajectory.response_text), stats.searches, stats.generated_tokens,
                   max(stats.turns, 1), stats.invalid_actions, trajectory.response_text)

    def scores(self) -> dict[str, float]:
        if self.prediction is None:
            return dict.fromkeys(ANSWER_METRICS, 0.0)
        return {"em": exact_match(self.prediction, self.golden_answers),
                "subem": substring_match(self.prediction, self.golden_answers),
                "f1": f1_score(self.prediction, self.golden_answers)}


def dataset_metrics(records: list[EvalRecord]) -> dict[str, float]:
    """The metrics of one dataset's records (answer metrics in percent)."""
    if not records:
        raise ValueError("no records to summarise")
    scores = [r.scores() for r in records]
    metrics = {name: 100.0 * statistics.fmean(s[name] for s in scores) for name in ANSWER_METRICS}
    metrics["searches"] = statistics.fmean(r.searches for r in records)
    metrics["tokens"] = statistics.fmean(r.generated_tokens for r in records)
    metrics["invalid_rate"] = sum(r.invalid_actions for r in records) / max(sum(r.turns for r in records), 1)
    metrics["n"] = float(len(records))
    return metrics


def summarize(records: list[EvalRecord]) -> dict[str, dict[str, float]]:
    """Per dataset metrics, datasets in the paper's order (others after, by name), and ``avg`` over datasets."""
    by_dataset: dict[str, list[EvalRecord]] = {}
    for record in records:
        by_dataset.setdefault(record.dataset, []).append(record)
    order = sorted(by_dataset, key=lambda d: (BENCHMARKS.index(d) if d in BENCHMARKS else len(BENCHMARKS), d))
    table = {name: dataset_metrics(by_dataset[name]) for name in order}
    table["avg"] = {m: statistics.fmean(row[m] for row in table.values()) for m in METRIC_NAMES}
    table["avg"]["n"] = float(sum(row["n"] for name, row in table.items() if name != "avg"))
    return table


def markdown_table(results: dict[str, dict[str, dict[str, float]]], metric: str = "subem") -> str:
    """Methods as rows, datasets as columns, the ``avg`` last in bold, as in the paper's tables."""
    datasets = [d for d in next(iter(results.values())) if d != "avg"]
    header = f"| {metric} | " + " | ".join(datasets) + " | **Avg** |"
    lines = [header, "|" + "---|" * (len(datasets) + 2)]
    for method, table in results.items():
        cells = [f"{table[d][metric]:.2f}" if d in table else "–" for d in datasets]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | **{table['avg'][metric]:.2f}** |")
    return "\n".join(lines)


def flat_rows(results: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """One row per (method, dataset) with every metric: what the CSV and the W&B table hold."""
    return [{"method": method, "dataset": dataset, **metrics}
            for method, table in results.items() for dataset, metrics in table.items()]
