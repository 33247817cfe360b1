"""Simulator replies spoiled on purpose (fault injection), to see that a rollout survives what a broken server sends.

The pool (``simulator/pool.py``) applies ``ReplyFaults`` to replies that did arrive: it holds each back by
``delay_s`` and replaces a ``garble_share`` of them, evenly spaced, by one of four kinds of garbage in turn.
Everything downstream must cope: an empty reply reads "No information available", the others are parsed and truncated
like any reply (``simulator/templates.parse_simulator_output``, ``actors/protocol.observation_token_ids``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

GARBAGE_KINDS = ("empty", "binary", "long", "no_docs")
LONG_REPLY_CHARS = 50_000


@dataclass
class ReplyFaults:
    """What the pool does to replies. The defaults do nothing.

    Attributes:
        garble_share: share of replies replaced by garbage, evenly spaced (``ReplyGarbler``).
        garble_kinds: the garbage, used in turn: ``empty`` (""), ``binary`` (random bytes with NULs), ``long``
            (50,000 characters of one document), ``no_docs`` (prose without a single "Doc i:" line).
        delay_s: every reply is held back this long before it is returned.
        seed: seeds the bytes of ``binary`` garbage.
    """

    garble_share: float = 0.0
    garble_kinds: list[str] = field(default_factory=lambda: list(GARBAGE_KINDS))
    delay_s: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.garble_share <= 1.0:
            raise ValueError(f"faults.garble_share={self.garble_share}: expected a share between 0 and 1")
        unknown = [k for k in self.garble_kinds if k not in GARBAGE_KINDS]
        if unknown or not self.garble_kinds:
            raise ValueError(f"faults.garble_kinds={list(self.garble_kinds)}: expected a non-empty list of "
                             f"{list(GARBAGE_KINDS)}")
        if self.delay_s < 0:
            raise ValueError(f"faults.delay_simulator_s={self.delay_s}: expected 0 or more seconds")

    @property
    def active(self) -> bool:
        return self.garble_share > 0 or self.delay_s > 0


def garbage(kind: str, rng: random.Random) -> str:
    """One garbled reply of ``kind``."""
    if kind == "empty":
        return ""
    if kind == "binary":
        return bytes(rng.randrange(256) for _ in range(512)).decode("latin-1")
    if kind == "long":
        return ("Doc 1: " + "lorem ipsum " * (LONG_REPLY_CHARS // 12 + 1))[:LONG_REPLY_CHARS]
    if kind == "no_docs":
        return "I am sorry, but I cannot help with that request. Please ask me something else."
    raise ValueError(f"unknown garbage kind {kind!r}; expected one of {list(GARBAGE_KINDS)}")


class ReplyGarbler:
    """Applies ``ReplyFaults`` to reply texts, the kinds in turn; counts what it did.

    Which replies are garbled is evenly spaced, not drawn: reply ``n`` (from 0) is garbled when ``⌊(n+1)·s⌋ > ⌊n·s⌋``,
    so any run of replies holds its share within one, and a short run sees its garbage for sure."""

    def __init__(self, faults: ReplyFaults) -> None:
        self.faults = faults
        self.rng = random.Random(faults.seed)  # the bytes of ``binary`` garbage
        self.seen = 0
        self.garbled = 0

    def __call__(self, text: str) -> tuple[str, bool]:
        """The text to return instead of ``text``, and whether it was garbled."""
        n, share = self.seen, self.faults.garble_share
        self.seen += 1
        if int((n + 1) * share) <= int(n * share):
            return text, False
        kind = self.faults.garble_kinds[self.garbled % len(self.faults.garble_kinds)]
        self.garbled += 1
        return garbage(kind, self.rng), True
