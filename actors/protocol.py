"""The text protocol between the policy and the search engine (spec section 1).

Everything the rollout needs to turn a question into a prompt, a generated turn into an action, and a search result
into the observation appended to the trajectory lives here, as pure functions. The rollout actor owns the loop; this
module owns the strings, so the exact texts the paper trained on are defined once.

Per turn the rollout does, in order:

1. ``cut_at_action(text)``: drop whatever the policy wrote after its first closing action tag;
2. ``parse_action(cut_text)``: decide between search, answer and invalid;
3. for a search, ``observation_token_ids(documents_text, tokenizer, max_obs_tokens)``; for an invalid action,
   ``INVALID_ACTION_MESSAGE``; for an answer, nothing (the trajectory is done).

Malformed output never raises; it is mapped to a defined action (see ``parse_action``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

# The typo "as your want" and the trailing newline are in the original; trained checkpoints saw exactly this text.
POLICY_TEMPLATE = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you get new "
    "information. After reasoning, if you find you lack some knowledge, you can call a search engine by <search> query "
    "</search> and it will return the top searched results between <information> and </information>. You can search "
    "as many times as your want. If you find no further external knowledge needed, you can directly provide the "
    "answer inside <answer> and </answer>, without detailed illustrations. For example, <answer> Beijing </answer>. "
    "Question: {question}\n"
)

# The original generated without stop strings and cut afterwards. Stopping at the first closing tag saves the tokens
# the policy would write past it; vLLM must keep the stop string (include_stop_str_in_output=True) so the action
# stays parseable, and cut_at_action is still applied because the two tags can both appear before either stop fires.
STOP_STRINGS: tuple[str, ...] = ("</search>", "</answer>")

INVALID_ACTION_MESSAGE = (
    "\nMy previous action is invalid. If I want to search, I should put the query between <search> and </search>. "
    "If I want to give the final answer, I should put the answer between <answer> and </answer>. Let me try again.\n"
)

OBSERVATION_HEAD = "\n\n<information>"
OBSERVATION_TAIL = "</information>\n\n"

# A query longer than this is cut (in characters) before it reaches the engine: a runaway generation inside
# <search> must not become a 10k-character simulator prompt or HTTP request.
MAX_QUERY_CHARS = 1000

_ACTION_PATTERN = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)

ActionKind = Literal["search", "answer", "invalid"]


# Baselines of the evaluation harness (the paper's Direct and RAG rows). The paper does not publish their prompts; these
# keep the policy template's answer format so that one extraction rule scores every method.
DIRECT_TEMPLATE = (
    "Answer the given question. Provide the answer inside <answer> and </answer>, without detailed illustrations. "
    "For example, <answer> Beijing </answer>. Question: {question}\n"
)
RAG_TEMPLATE = (
    "Answer the given question using the documents below. Provide the answer inside <answer> and </answer>, without "
    "detailed illustrations. For example, <answer> Beijing </answer>.\n\nDocuments:\n{documents}\n\n"
    "Question: {question}\n"
)


def _as_question(question: str) -> str:
    question = question.strip()
    return question if question.endswith("?") else question + "?"


def baseline_prompt(question: str, tokenizer: Any, documents: str | None = None) -> str:
    """The Direct prompt, or the RAG prompt when ``documents`` are given, as text (chat template applied)."""
    if documents is None:
        content = DIRECT_TEMPLATE.format(question=_as_question(question))
    else:
        content = RAG_TEMPLATE.format(question=_as_question(question), documents=documents.strip())
    return render_prompt([{"role": "user", "content": content}], tokenizer)


def baseline_prompt_token_ids(question: str, tokenizer: Any, documents: str | None = None,
                              max_prompt_tokens: int | None = None) -> list[int]:
    """``baseline_prompt`` as token ids, left-truncated to ``max_prompt_tokens``."""
    ids = _encode(tokenizer, baseline_prompt(question, tokenizer, documents))
    return ids[-max_prompt_tokens:] if max_prompt_tokens else ids


def make_prefix(question: str) -> str:
    """The policy prompt for one question: stripped, ending in "?", placed in ``POLICY_TEMPLATE``."""
    return POLICY_TEMPLATE.format(question=_as_question(question))


def build_prompt_messages(question: str) -> list[dict[str, str]]:
    """The chat the dataset stores: one user turn, no system message (the chat template adds its default)."""
    return [{"role": "user", "content": make_prefix(question)}]


def render_prompt(question_or_messages: str | Sequence[dict[str, str]], tokenizer: Any) -> str:
    """The prompt string the policy is conditioned on.

    A plain string is treated as a question. With a chat template the messages are rendered with the generation
    prompt appended; without one (some base tokenizers) the message contents are used as they are, concatenated.
    """
    if isinstance(question_or_messages, str):
        messages = build_prompt_messages(question_or_messages)
    else:
        messages = list(question_or_messages)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "".join(message["content"] for message in messages)


def prompt_token_ids(question: str, tokenizer: Any, max_prompt_tokens: int | None = None) -> list[int]:
    """The policy prompt of one question as token ids, keeping the last ``max_prompt_tokens`` when it is longer."""
    ids = _encode(tokenizer, render_prompt(question, tokenizer))
    return ids[-max_prompt_tokens:] if max_prompt_tokens else ids


@dataclass(frozen=True)
class Action:
    """What one generated turn asks for.

    ``content`` is the stripped query or answer, "" for an invalid action. ``note`` says why an action is invalid
    ("no_action_tag", "empty_query") or that a query was clamped ("query_clamped"); it is "" otherwise and is meant for
    logging, not for control flow.
    """

    kind: ActionKind
    content: str = ""
    note: str = ""


def parse_action(text: str) -> Action:
    """Parse one turn (after ``cut_at_action``) into an action, never raising.

    The first match of ``<(search|answer)>(.*?)</\\1>`` decides, as in the original. Defined results for malformed text:

    - no complete pair (unterminated ``<search>``, a bare ``</answer>``, ``<search>…</answer>``): invalid;
    - repeated tags: the first complete pair wins;
    - nested tags (``<search>a <search>b</search>``): the first opening tag pairs with the first matching closing
      tag, so the query is ``a <search>b``; it is passed on as it is, like the original;
    - a search whose query is empty after stripping: invalid, there is nothing to search;
    - an answer that is empty after stripping: still an answer (the episode ends and scores 0);
    - a query longer than ``MAX_QUERY_CHARS`` characters: cut to that length and stripped again;
    - non-ASCII text: handled like any other text.
    """
    match = _ACTION_PATTERN.search(text)
    if match is None:
        return Action("invalid", note="no_action_tag")
    kind, content = match.group(1), match.group(2).strip()
    if kind == "answer":
        return Action("answer", content)
    if not content:
        return Action("invalid", note="empty_query")
    if len(content) > MAX_QUERY_CHARS:
        return Action("search", content[:MAX_QUERY_CHARS].rstrip(), note="query_clamped")
    return Action("search", content)


def cut_at_action(text: str) -> str:
    """Drop everything after the first ``</search>``, or if there is none after the first ``</answer>``.

    Search takes priority in choosing where to cut (spec step 2). When an answer closes before the search, the cut
    text still holds it and ``parse_action``'s first match makes the turn an answer, as in the original. Text
    without a closing tag is returned unchanged.
    """
    for closing_tag in ("</search>", "</answer>"):  # this order is the priority
        position = text.find(closing_tag)
        if position != -1:
            return text[: position + len(closing_tag)]
    return text


def format_observation(documents_text: str) -> str:
    """The observation appended after a search: the documents between ``<information>`` tags."""
    return OBSERVATION_HEAD + documents_text.strip() + OBSERVATION_TAIL


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def observation_token_ids(documents_text: str, tokenizer: Any, max_obs_tokens: int) -> list[int]:
    """The observation's token ids, at most ``max_obs_tokens`` long, always ending with the closing tag.

    The original truncated the whole observation from the head, which cut off ``</information>`` whenever the
    documents were long, so the policy saw an unterminated block. Here the documents are truncated and the wrapper
    kept. An observation that fits is tokenized in one piece; a truncated one is head + kept documents + tail, each
    tokenized on its own, which may tokenize the seams differently from the joined text but decodes to it.

    Raises ValueError when ``max_obs_tokens`` cannot hold the wrapper alone: that is a configuration error.
    """
    head_ids = _encode(tokenizer, OBSERVATION_HEAD)
    tail_ids = _encode(tokenizer, OBSERVATION_TAIL)
    budget = max_obs_tokens - len(head_ids) - len(tail_ids)
    if budget < 0:
        raise ValueError(
            f"max_obs_tokens={max_obs_tokens} is smaller than the <information> wrapper alone "
            f"({len(head_ids) + len(tail_ids)} tokens); raise it"
        )
    full_ids = _encode(tokenizer, format_observation(documents_text))
    if len(full_ids) <= max_obs_tokens:
        return full_ids
    document_ids = _encode(tokenizer, documents_text.strip())
    return head_ids + document_ids[:budget] + tail_ids
