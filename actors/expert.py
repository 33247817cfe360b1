"""A scripted expert that writes protocol demonstrations: the cold start of small policies.

A 135M instruct model never writes a ``<search>`` or ``<answer>`` block from the paper's prompt alone, so RL from it
sees reward 0 everywhere and has no signal. The warm-up fine-tunes it on demonstrations of the protocol first.

The expert plays the policy's part inside the real episode loop (``run_episode``), so a demonstration is built exactly
as a rollout is: the same prompt tokens, the same ``<information>`` block from a real search engine appended with
``loss_mask`` 0, the same truncation. Its two turns are

    <think> ... </think>\\n<search> {the question, as a query} </search>
    <think> ... </think>\\n<answer> {the gold answer} </answer>

Only *grounded* demonstrations are kept for training: those whose retrieved documents contain the gold answer. The
policy should learn to answer from what it read, not to recite answers it could not have found.

The thoughts are drawn from a few phrasings per turn (by the demonstration's seed). The query is the question, or, for
a share of the demonstrations, the name the question is about (``warmup.name_query_share``) or that name followed by
the question's other content words (``warmup.keyword_query_share``): still a search on the question, but one that
shows a query can be a name rather than a restated question.
One fixed thought per turn trains to a loss near 0 within a few steps and leaves a policy whose samples of a question
are all alike, so RL's groups carry no signal. Varied thoughts keep probability mass on the decision after
``<information>`` (to answer, or to think about what is still missing) without demonstrating a second search, which is
what RL is there to find.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from actors.episode import EpisodeConfig, Generation, run_episode
from actors.protocol import OBSERVATION_HEAD, OBSERVATION_TAIL, prompt_token_ids
from actors.reward import substring_match
from simulator.base import SearchEngine

SEARCH_TURN = "<think> {thought} </think>\n<search> {query} </search>"
ANSWER_TURN = "<think> {thought} </think>\n<answer> {answer} </answer>"
SEARCH_THOUGHTS = (
    "I need to find {topic}. I will search for it.",
    "I do not know {topic}, so I will search for it.",
    "To answer, I have to look up {topic}.",
    "Let me search for {topic}.",
)
ANSWER_THOUGHTS = (
    "The information above gives the answer.",
    "The documents answer the question.",
    "I found what the question asks for in the results.",
    "The search results contain the answer.",
)
EVIDENCE_THOUGHTS = (
    "The documents say: {evidence}",
    "I read that {evidence}",
    "According to the results, {evidence}",
    "The information says: {evidence}",
)
# The same quotes, naming the query whose results they read: with two searches in the context, the name just
# searched points the quote at the last block (warmup.cite_query).
QUERY_EVIDENCE_THOUGHTS = (
    "The documents on {query} say: {evidence}",
    "Searching {query}, I read that {evidence}",
    "According to the results for {query}, {evidence}",
    "The information about {query} says: {evidence}",
)
EVIDENCE_MAX_WORDS = 40

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_DOC_HEAD = re.compile(r"^Doc \d+:\s*")
_INFORMATION = re.compile(re.escape(OBSERVATION_HEAD.strip()) + r"(.*?)" + re.escape(OBSERVATION_TAIL.strip()),
                          re.DOTALL)


@dataclass
class Demonstration:
    question: str
    golden_answers: tuple[str, ...]
    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]
    response_text: str
    reward: float
    grounded: bool  # the gold answer occurs in the retrieved documents


def expert_query(question: str) -> str:
    """The question as a search query: one line, no trailing question mark."""
    return " ".join(question.split()).rstrip("?").strip()


def entity_query(question: str) -> str | None:
    """The name the question is about, as a query: its longest run of capitalized words after the first word
    ("Who founded the company that Tavo Merin works for?" -> "Tavo Merin"). None when it names nothing."""
    runs, run = [], []
    for word in expert_query(question).split()[1:] + [""]:
        if word[:1].isupper():
            run.append(word.strip(",.;:'\""))
        elif run:
            runs.append(" ".join(run))
            run = []
    return max(runs, key=len) if runs else None


QUERY_STOPWORDS = frozenset(
    "a an the in on of for to at by with from which what who whom whose when where how is was are were does do did "
    "that".split())


def keyword_query(question: str) -> str:
    """The name the question is about, then the question's other words that carry meaning ("In which city was Tavo
    Merin born?" -> "Tavo Merin city born"). A search engine ranks the fact asked for first, and the query opens with
    a name, the form a second query needs when it searches for a name the first results gave."""
    name = entity_query(question)
    words = [w.strip(",.;:'\"") for w in expert_query(question).split()]
    span = len(name.split()) if name else 0
    at = next((i for i in range(len(words)) if name and words[i:i + span] == name.split()), None)
    if at is not None:
        words = words[:at] + words[at + span:]
    rest = [w for w in words if w.lower() not in QUERY_STOPWORDS]
    return " ".join(([name] if name else []) + rest) or expert_query(question)


QUERY_STYLES = {"question": expert_query, "name": lambda q: entity_query(q) or expert_query(q),
                "keywords": keyword_query}


def _topic(question: str) -> str:
    """"Who founded X?" -> "who founded X": a lower-cased restatement for the expert's thought."""
    query = expert_query(question)
    return query[:1].lower() + query[1:]


def decision_token_index(response_ids: list[int], loss_mask: list[int], tokenizer: Any) -> int | None:
    """Index of the token of the last turn that first tells ``<answer>`` from ``<search>``: the one that writes the
    character after ``<``. ``None`` when the last turn opens no ``<answer>``."""
    first = max((i for i, m in enumerate(loss_mask) if m == 0), default=-1) + 1  # the turn after the last observation
    turn = response_ids[first:]
    at = tokenizer.decode(turn, skip_special_tokens=True).rfind("<answer>")
    if at < 0:
        return None
    for k in range(1, len(turn) + 1):
        if len(tokenizer.decode(turn[:k], skip_special_tokens=True)) > at + 1:
            return first + k - 1
    return None


def search_again_ids(response_ids: list[int], loss_mask: list[int], tokenizer: Any) -> list[int] | None:
    """The demonstration's response cut at its decision token, which is replaced by the one that opens ``<search>``
    instead of ``<answer>``: the same turn, choosing to search again. ``None`` when the turn has no decision token."""
    k = decision_token_index(response_ids, loss_mask, tokenizer)
    if k is None:
        return None
    first = max((i for i, m in enumerate(loss_mask) if m == 0), default=-1) + 1
    prefix = tokenizer.decode(response_ids[first:k], skip_special_tokens=True)
    cut = prefix[:prefix.rfind("<") + 1]  # the decision token may also carry the "<" (or more) of the tag
    searched = list(tokenizer.encode(cut + "search>", add_special_tokens=False))
    kept = list(tokenizer.encode(cut, add_special_tokens=False))
    if kept != response_ids[first:first + len(kept)] or searched[:len(kept)] != kept or len(searched) == len(kept):
        return None  # the tokenizer merges across the cut: no single token makes the choice
    return response_ids[:first] + searched[:len(kept) + 1]


def information_text(response_text: str) -> str:
    """Everything the response read inside ``<information>`` blocks."""
    return "\n".join(_INFORMATION.findall(response_text))


def evidence_sentence(information: str, golden_answers: tuple[str, ...]) -> str | None:
    """The first sentence of the retrieved documents that contains a gold answer, without its ``Doc k:`` head and cut
    to ``EVIDENCE_MAX_WORDS`` words; None when no sentence does."""
    for line in information.splitlines():
        for sentence in _SENTENCE_END.split(_DOC_HEAD.sub("", line.strip())):
            if sentence and substring_match(sentence, golden_answers):
                words = sentence.split()
                return " ".join(words[:EVIDENCE_MAX_WORDS])
    return None


async def write_demonstration(
    question: str,
    golden_answers: tuple[str, ...],
    engine: SearchEngine,
    tokenizer: Any,
    cfg: EpisodeConfig,
    seed: int | None = None,
    max_prompt_tokens: int | None = None,
    query_style: str = "question",
    cite_evidence: bool = False,
    cite_query: bool = False,
) -> Demonstration:
    """One demonstration: the expert searches the question, reads the real result, and answers with the gold answer.
    ``seed`` picks the phrasing of its two thoughts. ``query_style`` picks how the question becomes a query
    (``QUERY_STYLES``: the question, the name it is about, or that name and its keywords). ``cite_evidence``: the
    answering thought quotes the retrieved sentence that holds the answer (``evidence_sentence``) instead of saying
    only that the results hold it; ``cite_query`` makes that quote name the query first ("Searching Tavo Merin, I
    read that …")."""
    k = 0 if seed is None else seed
    search_thought = SEARCH_THOUGHTS[k % len(SEARCH_THOUGHTS)].format(topic=_topic(question))
    query = QUERY_STYLES[query_style](question)
    written = 0

    def answer_thought(context_ids: list[int]) -> str:
        pick = (k // len(SEARCH_THOUGHTS)) % len(ANSWER_THOUGHTS)
        evidence = cite_evidence and evidence_sentence(
            information_text(tokenizer.decode(context_ids, skip_special_tokens=True)), golden_answers)
        if not evidence:
            return ANSWER_THOUGHTS[pick]
        if cite_query:
            return QUERY_EVIDENCE_THOUGHTS[pick].format(query=query, evidence=evidence)
        return EVIDENCE_THOUGHTS[pick].format(evidence=evidence)

    async def generate(context_ids: list[int], budget: int) -> Generation:
        nonlocal written
        if written == 0:
            text = SEARCH_TURN.format(thought=search_thought, query=query)
        else:
            text = ANSWER_TURN.format(thought=answer_thought(context_ids), answer=golden_answers[0])
        written += 1
        ids = list(tokenizer.encode(text, add_special_tokens=False))[:budget]
        return Generation(ids, [0.0] * len(ids), "stop")

    prompt_ids = prompt_token_ids(question, tokenizer, max_prompt_tokens)
    result = await run_episode(prompt_ids, question, golden_answers, generate, engine, tokenizer, cfg,
                               noise_prob=0.0, seed=seed)
    grounded = bool(substring_match(information_text(result.response_text), golden_answers))
    return Demonstration(question, golden_answers, prompt_ids, result.response_ids, result.loss_mask,
                         result.response_text, result.reward, grounded)
