"""The answer normaliser that rewards, evaluation and the simulator's data labels share.

It sits at the bottom of the tree so that ``simulator/`` can label documents by whether they hold an answer without
importing ``actors`` (which imports ``simulator``).
"""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalization: lowercase, drop punctuation, drop articles, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())
