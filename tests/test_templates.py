"""Simulator prompts (byte for byte against the spec) and the parsing of simulator output."""

import pytest

from simulator.templates import (
    PROMPT_NOISY_TEMPLATE,
    PROMPT_USEFUL_TEMPLATE,
    SFT_NOISY_TEMPLATE,
    SFT_USEFUL_TEMPLATE,
    build_simulator_prompt,
    parse_simulator_output,
)

# Copied from the spec line by line, independently of the module; each template ends with "Output:\n" as in the
# original code.
SFT_USEFUL_LINES = [
    "You are the Google search engine.",
    "Given a query, you need to generate five useful documents for the query.",
    "",
    'The user is trying to answer the question: "{problem}" whose answer is {ground_truth}.',
    "Each document should contain about 30 words, and these documents should contain useful information.",
    "",
    "Query: {query}",
    "Useful Output:",
    "",
]
SFT_NOISY_LINES = [
    "You are the Google search engine.",
    "Given a query, you need to generate five noisy documents for the query.",
    "",
    'The user is trying to answer the question: "{problem}" whose answer is {ground_truth}.',
    "Each document should contain about 30 words, and these documents should contain noisy information.",
    "",
    "Query: {query}",
    "Noisy Output:",
    "",
]
PROMPT_USEFUL_LINES = [
    "You are the Google search engine.",
    (
        "Given a query, you need to imitate the style of the following demos and generate five useful documents for "
        "the query."
    ),
    "",
    "Here is an example:",
    "Query: George Washington Bridge opening year",
    "Useful Output:",
    (
        "Doc 1: The George Washington Bridge, an iconic structure connecting New York City to New Jersey, opened on "
        "October 25, 1931. Designed by Othmar Ammann, it marked a major milestone in civil engineering."
    ),
    (
        "Doc 2: Originally the Hudson River Bridge, the George Washington Bridge was named after the U.S.'s first "
        "president. Its 3,500-foot suspension span was the world's longest at completion in 1931."
    ),
    (
        "Doc 3: The bridge was modified in 1962 with added lower deck lanes, increasing capacity and easing "
        "congestion. This expansion transformed the bridge into a double-decked structure with twelve lanes."
    ),
    (
        "Doc 4: Constructed over four years, the George Washington Bridge's steel towers and cables exemplified "
        "engineering progress. It crucially linked New York and New Jersey's transportation networks."
    ),
    (
        "Doc 5: Handling over 103 million annual vehicles, the George Washington Bridge is globally one of the "
        "busiest. The Port Authority of NY and NJ oversees its traffic and infrastructure maintenance."
    ),
    "",
    'The user is trying to answer the question: "{problem}" whose answer is {ground_truth}.',
    "You should generate documents that can help the user find the answer.",
    "Each document should contain about 30 words.",
    "You must directly output the English documents and not output any other texts.",
    "",
    "Query: {query}",
    "Useful Output:",
    "",
]
PROMPT_NOISY_LINES = [
    "You are the Google search engine. ",  # trailing space is in the original
    (
        "Given a query, you need to imitate the style of the following demos and generate five related but noisy "
        "documents for the query."
    ),
    "",
    "Here is an example:",
    "Query: George Washington Bridge opening year",
    "Noisy Output:",
    (
        "Doc 1: The George Washington Bridge was a significant addition to New York's infrastructure, but there were "
        "many challenges during its construction, including budget overruns and worker strikes."
    ),
    (
        "Doc 2: While often mistaken for the opening of another iconic bridge, the Brooklyn Bridge, the George "
        "Washington Bridge has its own storied history involving political maneuvering and urban planning debates that "
        "shaped the bridge's final design."
    ),
    (
        "Doc 3: Discussions about the naming of the George Washington Bridge are interesting, as it was named to honor "
        "the first President of the United States. The name choice was significant given the geographical and "
        "historical implications of Washington's legacy."
    ),
    (
        "Doc 4: The bridge has been a point of contention over toll increases, traffic congestion solutions, and "
        "environmental impact assessments, which continue to affect policy decisions in the area."
    ),
    (
        "Doc 5: Considerations around the visual and architectural design of the George Washington Bridge also played "
        "a crucial role in its legacy as a landmark, balancing aesthetics with functionality."
    ),
    "",
    "Each document should contain about 30 words, and these documents should contain related but noisy information.",
    "You must directly output the English documents and not output any other texts.",
    "",
    "Query: {query}",
    "Noisy Output:",
    "",
]


@pytest.mark.parametrize(
    "template, lines",
    [
        (SFT_USEFUL_TEMPLATE, SFT_USEFUL_LINES),
        (SFT_NOISY_TEMPLATE, SFT_NOISY_LINES),
        (PROMPT_USEFUL_TEMPLATE, PROMPT_USEFUL_LINES),
        (PROMPT_NOISY_TEMPLATE, PROMPT_NOISY_LINES),
    ],
)
def test_templates_byte_for_byte(template, lines):
    assert template == "\n".join(lines)


def test_prompt_mode_noisy_has_no_question_or_answer():
    assert "{problem}" not in PROMPT_NOISY_TEMPLATE and "{ground_truth}" not in PROMPT_NOISY_TEMPLATE
    assert PROMPT_NOISY_TEMPLATE.startswith("You are the Google search engine. \n")


@pytest.mark.parametrize(
    "mode, useful, lines",
    [
        ("sft", True, SFT_USEFUL_LINES),
        ("sft", False, SFT_NOISY_LINES),
        ("prompt", True, PROMPT_USEFUL_LINES),
        ("prompt", False, PROMPT_NOISY_LINES),
    ],
)
def test_build_simulator_prompt_fills_placeholders(mode, useful, lines):
    prompt = build_simulator_prompt("eiffel tower height", "How tall is the Eiffel Tower?", "330 m", useful, mode)
    expected = (
        "\n".join(lines)
        .replace("{problem}", "How tall is the Eiffel Tower?")
        .replace("{ground_truth}", "330 m")
        .replace("{query}", "eiffel tower height")
    )
    assert prompt == expected
    assert "{" not in prompt


def test_sft_prompt_tail_and_plain_ground_truth():
    prompt = build_simulator_prompt("q1", "Who?", "Ringo Starr", useful=True, mode="sft")
    assert 'question: "Who?" whose answer is Ringo Starr.\n' in prompt
    assert prompt.endswith("\n\nQuery: q1\nUseful Output:\n")


def test_braces_in_inputs_are_literal():
    prompt = build_simulator_prompt("set {x} {query}", "what is {ground_truth}?", "{query}", useful=True, mode="sft")
    assert 'question: "what is {ground_truth}?" whose answer is {query}.' in prompt
    assert prompt.endswith("Query: set {x} {query}\nUseful Output:\n")


def test_bad_mode_names_choices():
    with pytest.raises(ValueError, match=r"'sft', 'prompt'"):
        build_simulator_prompt("q", "Q?", "A", useful=True, mode="google")


# --- parsing --------------------------------------------------------------------------------------------------------


def test_parse_prefixed_documents():
    text = "Doc 1: alpha one\n\nDoc 2: beta two\nDoc 3:   gamma  \n"
    assert parse_simulator_output(text) == ["alpha one", "beta two", "gamma"]


def test_parse_cuts_at_doc_top_k_plus_one():
    text = "\n".join(f"Doc {i}: text {i}" for i in range(1, 8))
    assert parse_simulator_output(text) == [f"text {i}" for i in range(1, 6)]
    assert parse_simulator_output(text, top_k=2) == ["text 1", "text 2"]


def test_parse_caps_at_top_k_without_prefixes():
    text = "one\n\ntwo\nthree\n  \nfour\nfive\nsix\nseven"
    assert parse_simulator_output(text) == ["one", "two", "three", "four", "five"]
    assert parse_simulator_output(text, top_k=3) == ["one", "two", "three"]


def test_parse_continuation_lines_and_preamble():
    text = "Sure! Here are five documents:\n\nDoc 1: first line\ncontinued here\nDoc 2: second"
    assert parse_simulator_output(text) == ["first line continued here", "second"]


def test_parse_tolerates_markdown_and_spacing():
    text = "**Doc 1:** bold prefix\n- Doc 2 : bulleted\n  Doc3: no space"
    assert parse_simulator_output(text) == ["bold prefix", "bulleted", "no space"]


def test_parse_drops_empty_documents():
    assert parse_simulator_output("Doc 1:\nDoc 2: only this\nDoc 3:   ") == ["only this"]


@pytest.mark.parametrize("text", [None, "", "   \n\n \t", "Doc 1:", "Doc 6: past the cut"])
def test_parse_empty_or_unusable_output(text):
    assert parse_simulator_output(text) == []


def test_parse_rejects_nonpositive_top_k():
    with pytest.raises(ValueError):
        parse_simulator_output("Doc 1: x", top_k=0)
