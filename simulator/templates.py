"""The simulator's prompts and the parsing of its output (spec section 2).

The released simulator checkpoints were fine-tuned on the SFT-mode prompts, and the prompt-mode ones are what an
off-the-shelf instruct model is shown, so both are part of the method's interface and are kept byte for byte,
including the original's quirks: "five" whatever top_k is, a trailing space after "engine." in the prompt-mode noisy
prompt, and no question or answer in that prompt. Each ends with a newline after "Output:", as in the original code.
"""

from __future__ import annotations

import re

SFT_USEFUL_TEMPLATE = """You are the Google search engine.
Given a query, you need to generate five useful documents for the query.

The user is trying to answer the question: "{problem}" whose answer is {ground_truth}.
Each document should contain about 30 words, and these documents should contain useful information.

Query: {query}
Useful Output:
"""

SFT_NOISY_TEMPLATE = """You are the Google search engine.
Given a query, you need to generate five noisy documents for the query.

The user is trying to answer the question: "{problem}" whose answer is {ground_truth}.
Each document should contain about 30 words, and these documents should contain noisy information.

Query: {query}
Noisy Output:
"""

PROMPT_USEFUL_TEMPLATE = """You are the Google search engine.
Given a query, you need to imitate the style of the following demos and generate five useful documents for the query.

Here is an example:
Query: George Washington Bridge opening year
Useful Output:
Doc 1: The George Washington Bridge, an iconic structure connecting New York City to New Jersey, opened on October 25, \
1931. Designed by Othmar Ammann, it marked a major milestone in civil engineering.
Doc 2: Originally the Hudson River Bridge, the George Washington Bridge was named after the U.S.'s first president. \
Its 3,500-foot suspension span was the world's longest at completion in 1931.
Doc 3: The bridge was modified in 1962 with added lower deck lanes, increasing capacity and easing congestion. This \
expansion transformed the bridge into a double-decked structure with twelve lanes.
Doc 4: Constructed over four years, the George Washington Bridge's steel towers and cables exemplified engineering \
progress. It crucially linked New York and New Jersey's transportation networks.
Doc 5: Handling over 103 million annual vehicles, the George Washington Bridge is globally one of the busiest. The \
Port Authority of NY and NJ oversees its traffic and infrastructure maintenance.

The user is trying to answer the question: "{problem}" whose answer is {ground_truth}.
You should generate documents that can help the user find the answer.
Each document should contain about 30 words.
You must directly output the English documents and not output any other texts.

Query: {query}
Useful Output:
"""

# The space after "engine." on the first line is in the original; written as \x20 so editors cannot strip it.
PROMPT_NOISY_TEMPLATE = """You are the Google search engine.\x20
Given a query, you need to imitate the style of the following demos and generate five related but noisy documents \
for the query.

Here is an example:
Query: George Washington Bridge opening year
Noisy Output:
Doc 1: The George Washington Bridge was a significant addition to New York's infrastructure, but there were many \
challenges during its construction, including budget overruns and worker strikes.
Doc 2: While often mistaken for the opening of another iconic bridge, the Brooklyn Bridge, the George Washington \
Bridge has its own storied history involving political maneuvering and urban planning debates that shaped the \
bridge's final design.
Doc 3: Discussions about the naming of the George Washington Bridge are interesting, as it was named to honor the \
first President of the United States. The name choice was significant given the geographical and historical \
implications of Washington's legacy.
Doc 4: The bridge has been a point of contention over toll increases, traffic congestion solutions, and \
environmental impact assessments, which continue to affect policy decisions in the area.
Doc 5: Considerations around the visual and architectural design of the George Washington Bridge also played a \
crucial role in its legacy as a landmark, balancing aesthetics with functionality.

Each document should contain about 30 words, and these documents should contain related but noisy information.
You must directly output the English documents and not output any other texts.

Query: {query}
Noisy Output:
"""

# (mode, useful) -> template
TEMPLATES: dict[tuple[str, bool], str] = {
    ("sft", True): SFT_USEFUL_TEMPLATE,
    ("sft", False): SFT_NOISY_TEMPLATE,
    ("prompt", True): PROMPT_USEFUL_TEMPLATE,
    ("prompt", False): PROMPT_NOISY_TEMPLATE,
}
MODES = ("sft", "prompt")

_PLACEHOLDER = re.compile(r"\{(problem|ground_truth|query)\}")
# "Doc 3:" at the start of a line; markdown bullets or bold around it are tolerated since instruct models add them.
_DOC_PREFIX = re.compile(r"^[\s*#>-]*Doc\s*\d+\s*\**\s*:\s*\**\s*", re.IGNORECASE | re.MULTILINE)


def build_simulator_prompt(query: str, question: str, ground_truth: str, useful: bool, mode: str) -> str:
    """The simulator prompt for one search call.

    ``ground_truth`` is the episode's first gold answer, inserted plain (no quotes), as the original's f-string did.
    The placeholders are filled in one pass rather than with str.format, so braces in a query, question or answer
    are kept literally instead of raising or being filled in turn.
    """
    if mode not in MODES:
        raise ValueError(f"unknown simulator mode {mode!r}; choose one of {list(MODES)}")
    values = {"problem": question, "ground_truth": ground_truth, "query": query}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], TEMPLATES[(mode, bool(useful))])


def parse_simulator_output(text: str | None, top_k: int = 5) -> list[str]:
    """Split the simulator's reply into at most ``top_k`` documents, without their "Doc i:" prefixes.

    First the original post-processing: "\\n\\n" becomes "\\n" and everything from the first "Doc {top_k+1}" on is
    dropped. Then:

    - with "Doc i:" prefixes, each prefix starts a document, lines without one continue the current document, and
      chatter before the first prefix ("Sure, here are...") is dropped;
    - without any prefix, each non-empty line is a document;
    - empty documents are dropped, whitespace is collapsed, and empty or blank output gives [], which the caller
      reports as a failed search.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if not text or not text.strip():
        return []
    text = text.replace("\n\n", "\n").split(f"Doc {top_k + 1}")[0]

    prefixes = list(_DOC_PREFIX.finditer(text))
    if prefixes:
        ends = [match.start() for match in prefixes[1:]] + [len(text)]
        pieces = [text[match.end() : end] for match, end in zip(prefixes, ends)]
    else:
        pieces = text.splitlines()

    documents = [" ".join(piece.split()) for piece in pieces]
    return [doc for doc in documents if doc][:top_k]
