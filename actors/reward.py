"""Answer extraction, QA metrics and the training reward (spec section 5).

The training reward is token F1 between the policy's last answer and the gold answers, with no format reward.
Evaluation also reports strict exact match and substring match; the paper's tables call the latter "EM".

Unlike the original, the answer is read from the response only: the original decoded prompt + response, and since
the prompt itself holds two ``<answer>`` blocks, a trajectory that never answered was scored as "Beijing".
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from actors.protocol import INVALID_ACTION_MESSAGE
from simulator.answers import normalize_answer

_ANSWER_PATTERN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_INFORMATION_PATTERN = re.compile(r"<information>.*?</information>", re.DOTALL)
# Ends the policy prompt's instructions; everything before it is prompt, never a prediction.
_PROMPT_EXAMPLE = "For example, <answer> Beijing </answer>."

Golds = str | Iterable[str]


def _strip_non_policy_text(text: str) -> str:
    """Remove the text the policy did not write but which can contain ``<answer>`` blocks.

    The caller should already pass the response only; this is a guard. It drops a policy prompt if one slipped in,
    the invalid-action message (which quotes ``<answer> and </answer>``) and retrieved documents.
    """
    if _PROMPT_EXAMPLE in text:
        text = text.rsplit(_PROMPT_EXAMPLE, 1)[1]
    text = text.replace(INVALID_ACTION_MESSAGE, "")
    return _INFORMATION_PATTERN.sub("", text)


def extract_answer(response_text: str) -> str | None:
    """The stripped content of the last complete ``<answer>…</answer>`` the policy wrote, None if there is none."""
    matches = _ANSWER_PATTERN.findall(_strip_non_policy_text(response_text))
    if not matches:
        return None
    return matches[-1].strip()


def _as_list(golds: Golds) -> list[str]:
    # A bare string would otherwise be iterated character by character.
    if isinstance(golds, str):
        return [golds]
    return [str(gold) for gold in golds]


def _token_f1(prediction: str, gold: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    overlap = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Golds) -> float:
    """Token F1 (multiset overlap of normalized whitespace tokens), the best over the gold answers."""
    return max((_token_f1(prediction, gold) for gold in _as_list(golds)), default=0.0)


def exact_match(prediction: str, golds: Golds) -> float:
    """1.0 if the normalized prediction equals some normalized gold answer (Search-R1's strict EM)."""
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(gold) for gold in _as_list(golds)))


def substring_match(prediction: str, golds: Golds) -> float:
    """1.0 if some normalized gold answer occurs inside the normalized prediction: the paper's "EM".

    A gold that normalizes to "" never matches, otherwise it would be a substring of everything.
    """
    normalized = normalize_answer(prediction)
    return float(
        any(gold_norm and gold_norm in normalized for gold_norm in (normalize_answer(g) for g in _as_list(golds)))
    )


METRICS: dict[str, Callable[[str, Golds], float]] = {
    "f1": f1_score,
    "exact_match": exact_match,
    "substring_match": substring_match,
}


def even_token_share(token_ids: Sequence[int], loss_mask: Sequence[int]) -> float:
    """Share of the policy's own tokens (``loss_mask`` 1) whose id is even: a probe reward, not a QA metric.

    Half the vocabulary scores, so a random policy's samples already differ in reward and GRPO has a signal from the
    first step. If the mean of this reward does not rise, something between sampling and the update (advantages,
    masking, the loss sign, weight sync) points the wrong way. Observation tokens never count.
    """
    own = [t for t, m in zip(token_ids, loss_mask) if m]
    return sum(t % 2 == 0 for t in own) / len(own) if own else 0.0


PROBE_REWARDS = ("even_token_share",)


def score_response(response_text: str, golds: Golds, metric: str = "f1") -> float:
    """Score one response (without its prompt) against the gold answers; a response with no answer scores 0.0."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)}")
    answer = extract_answer(response_text)
    if answer is None:
        return 0.0
    return METRICS[metric](answer, golds)
