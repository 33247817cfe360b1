"""Which prompts each step trains on: seeded epochs over the training set, resumable from a saved position; and the
episode requests (group id, seed) of the prompts drawn."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

from actors.dataset import QAExample
from actors.rollout import EpisodeRequest


class PromptSampler:
    """Walks seeded permutations of the dataset, one epoch after another. Its state is (epoch, position), so a resumed
    run draws exactly the prompts the interrupted run would have drawn next.

    With ``stratify`` each epoch spreads every data source evenly over its length (``spread_sources``), so that any
    run of consecutive draws holds each source near its share of the set. A plain shuffle of a mixed set (single-hop
    and multi-hop, as the paper's NQ + HotpotQA) can hand a short run several steps of one kind in a row."""

    def __init__(self, examples: list[QAExample], seed: int, shuffle: bool = True, stratify: bool = False) -> None:
        if not examples:
            raise ValueError("the training set is empty")
        self.examples = examples
        self.seed = seed
        self.shuffle = shuffle
        self.stratify = stratify
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        rng = random.Random(self.seed * 100_003 + epoch)
        if self.shuffle:
            rng.shuffle(order)
        if self.stratify:
            order = spread_sources(order, [self.examples[i].data_source for i in order], rng if self.shuffle else None)
        return order

    def next(self, count: int) -> list[QAExample]:
        batch = []
        while len(batch) < count:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            batch.append(self.examples[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": len(self.examples),
                "stratify": self.stratify}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["size"] != len(self.examples) or state["seed"] != self.seed:
            raise ValueError(f"sampler state is for {state['size']} examples with seed {state['seed']}, "
                             f"this run has {len(self.examples)} with seed {self.seed}")
        if state.get("stratify", False) != self.stratify:
            raise ValueError(f"sampler state was saved with data.stratify={state.get('stratify', False)}, this run "
                             f"has data.stratify={self.stratify}: the order of the remaining draws would differ")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


def spread_sources(order: list[int], sources: list[str], rng: random.Random | None) -> list[int]:
    """``order`` rearranged so that each source's items, in their order, are spread evenly over its length.

    The j-th of a source's n items is placed at key (j + u) / n, with u uniform in [0, 1) (0.5 without ``rng``), and
    all items are sorted by key. Any run of w consecutive items then holds within about 2 of w * n / len(order) of
    every source."""
    by_source: dict[str, list[int]] = defaultdict(list)
    for index, source in zip(order, sources):
        by_source[source].append(index)
    keyed = [((j + (rng.random() if rng else 0.5)) / len(items), index)
             for items in by_source.values() for j, index in enumerate(items)]
    return [index for _, index in sorted(keyed)]


def episode_requests(prompts: list, seed: int, step: int, first_index: int = 0,
                     open_search_share: float | None = None) -> list[EpisodeRequest]:
    """One request per drawn prompt, each with its own group id and seed (and the step's ``open_search_share``).

    A group id names one draw, not one question: when the sampler wraps an epoch inside a step the same question can
    be drawn twice, and keyed by its uid the two groups would merge into one group of 2G. ``first_index`` numbers
    the prompts of a refill round after those of the step's earlier rounds."""
    return [EpisodeRequest(group_id, p.question, p.golden_answers, p.data_source,
                           seed=seed * 1_000_003 + step * 1000 + first_index + i,
                           open_search_share=open_search_share)
            for i, (p, group_id) in enumerate(zip(prompts, group_ids(prompts, step, first_index)))]


def group_ids(prompts: list, step: int, first_index: int = 0) -> list[str]:
    """The group id of each drawn prompt: its uid, the step and its place among the step's draws."""
    return [f"{p.uid}@{step}.{first_index + i}" for i, p in enumerate(prompts)]
