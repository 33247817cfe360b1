"""A finished episode's text as a readable trace: what the policy thought, searched, read and answered."""

from __future__ import annotations

import re

from actors.protocol import INVALID_ACTION_MESSAGE

_SEGMENT = re.compile(r"<(think|search|information|answer)>(.*?)(?:</\1>|$)", re.DOTALL)


def trace_segments(text: str) -> list[tuple[str, str]]:
    """``(kind, content)`` in order: a tag's kind and stripped content, ``invalid`` where the environment answered an
    invalid action (its message quotes the tags, so it is cut out first), or ``text`` for anything outside the tags
    (an unclosed tag runs to the end, as when a turn was cut by its token budget)."""
    marker = INVALID_ACTION_MESSAGE.strip()
    segments: list[tuple[str, str]] = []
    for i, part in enumerate(text.split(marker)):
        if i:
            segments.append(("invalid", "the action was not a search or an answer; the policy is told to retry"))
        segments += _tag_segments(part)
    return segments


def _tag_segments(text: str) -> list[tuple[str, str]]:
    segments: list[tuple[str, str]] = []
    position = 0
    for match in _SEGMENT.finditer(text):
        between = text[position:match.start()].strip()
        if between:
            segments.append(("text", between))
        segments.append((match.group(1), match.group(2).strip()))
        position = match.end()
    rest = text[position:].strip()
    if rest:
        segments.append(("text", rest))
    return segments


def render_trace(text: str, max_information_chars: int = 600) -> str:
    """One block per segment under a label; long ``<information>`` is shortened (it is the engine's text)."""
    blocks = []
    for kind, content in trace_segments(text):
        if kind == "information" and len(content) > max_information_chars:
            content = content[:max_information_chars].rstrip() + " …"
        label = "ANSWER" if kind == "answer" else kind
        blocks.append(f"[{label}] {content}" if "\n" not in content else f"[{label}]\n{content}")
    return "\n".join(blocks)


__all__ = ["render_trace", "trace_segments"]
