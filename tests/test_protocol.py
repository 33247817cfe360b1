"""The policy <-> search text protocol: prompt, action parsing, observations."""

import pytest

from actors.protocol import (
    INVALID_ACTION_MESSAGE,
    MAX_QUERY_CHARS,
    OBSERVATION_HEAD,
    OBSERVATION_TAIL,
    POLICY_TEMPLATE,
    STOP_STRINGS,
    Action,
    build_prompt_messages,
    cut_at_action,
    format_observation,
    make_prefix,
    observation_token_ids,
    parse_action,
    render_prompt,
)

# Written out independently of the module, from the spec (typo "as your want" included).
EXPECTED_TEMPLATE = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you get new "
    "information. After reasoning, if you find you lack some knowledge, you can call a search engine by <search> query "
    "</search> and it will return the top searched results between <information> and </information>. You can search "
    "as many times as your want. If you find no further external knowledge needed, you can directly provide the "
    "answer inside <answer> and </answer>, without detailed illustrations. For example, <answer> Beijing </answer>. "
    "Question: {question}\n"
)
EXPECTED_INVALID = (
    "\nMy previous action is invalid. If I want to search, I should put the query between <search> and </search>. "
    "If I want to give the final answer, I should put the answer between <answer> and </answer>. Let me try again.\n"
)


class CharTokenizer:
    """One token per character, so token counts are string lengths."""

    chat_template = None

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False, "the protocol must not add BOS/EOS to observations"
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class ChatTokenizer(CharTokenizer):
    chat_template = "{{ fake }}"

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        self.calls.append((messages, add_generation_prompt, tokenize))
        return "<|user|>" + messages[0]["content"] + "<|assistant|>"


# --- prompt ---------------------------------------------------------------------------------------------------------


def test_policy_template_is_the_papers_text():
    assert POLICY_TEMPLATE == EXPECTED_TEMPLATE
    assert INVALID_ACTION_MESSAGE == EXPECTED_INVALID


def test_make_prefix_strips_and_appends_question_mark():
    prefix = make_prefix("  who wrote hamlet \n")
    assert prefix.endswith("Question: who wrote hamlet?\n")
    assert prefix == EXPECTED_TEMPLATE.replace("{question}", "who wrote hamlet?")


def test_make_prefix_keeps_existing_question_mark():
    assert make_prefix("Is Paris in France?").endswith("Question: Is Paris in France?\n")


def test_build_prompt_messages_is_one_user_turn():
    messages = build_prompt_messages("capital of France")
    assert messages == [{"role": "user", "content": make_prefix("capital of France")}]


def test_render_prompt_uses_chat_template_with_generation_prompt():
    tokenizer = ChatTokenizer()
    rendered = render_prompt("capital of France", tokenizer)
    assert rendered == "<|user|>" + make_prefix("capital of France") + "<|assistant|>"
    ((messages, add_generation_prompt, tokenize),) = tokenizer.calls
    assert messages == build_prompt_messages("capital of France")
    assert add_generation_prompt is True and tokenize is False


def test_render_prompt_without_chat_template_is_raw_content():
    messages = build_prompt_messages("capital of France")
    assert render_prompt(messages, CharTokenizer()) == make_prefix("capital of France")
    assert render_prompt("capital of France", CharTokenizer()) == make_prefix("capital of France")


# --- actions --------------------------------------------------------------------------------------------------------


def test_stop_strings():
    assert set(STOP_STRINGS) == {"</search>", "</answer>"}


def test_parse_search_and_answer():
    assert parse_action("<think>hm</think><search>  capital of France </search>") == Action(
        "search", "capital of France"
    )
    assert parse_action("<think>ok</think>\n<answer> Paris </answer>") == Action("answer", "Paris")


def test_parse_first_match_wins():
    assert parse_action("<search>a</search><answer>b</answer>").content == "a"
    assert parse_action("<answer>b</answer><search>a</search>") == Action("answer", "b")
    assert parse_action("<search>first</search> <search>second</search>").content == "first"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "I think the answer is Paris.",
        "<search>unterminated query",
        "<answer>unterminated answer",
        "Paris</answer>",  # bare closing tag
        "<search>mismatched</answer>",
        "<Search>wrong case</Search>",
    ],
)
def test_parse_without_complete_pair_is_invalid(text):
    assert parse_action(text) == Action("invalid", "", "no_action_tag")


@pytest.mark.parametrize("text", ["<search></search>", "<search>  \n\t </search>"])
def test_empty_query_is_invalid(text):
    assert parse_action(text) == Action("invalid", "", "empty_query")


def test_empty_answer_still_ends_the_episode():
    assert parse_action("<answer> </answer>") == Action("answer", "")


def test_long_query_is_clamped():
    action = parse_action("<search>" + "x" * 10_000 + "</search>")
    assert action.kind == "search"
    assert action.content == "x" * MAX_QUERY_CHARS
    assert action.note == "query_clamped"


def test_clamped_query_has_no_trailing_space():
    action = parse_action("<search>" + "a" * (MAX_QUERY_CHARS - 1) + " bbbb</search>")
    assert action.content == "a" * (MAX_QUERY_CHARS - 1)


def test_nested_tags_pair_first_open_with_first_close():
    assert parse_action("<search>a <search>b</search> c</search>") == Action("search", "a <search>b")


def test_non_ascii_and_multiline_content():
    assert parse_action("<search>Émile Zola 小说\n年份</search>") == Action("search", "Émile Zola 小说\n年份")
    assert parse_action("<answer>Москва</answer>") == Action("answer", "Москва")


def test_cut_at_search_takes_priority_over_earlier_answer():
    text = "<answer>x</answer> then <search>q</search> trailing <information>fake</information>"
    assert cut_at_action(text) == "<answer>x</answer> then <search>q</search>"


def test_cut_at_first_closing_tag():
    assert cut_at_action("<answer>a</answer> more <answer>b</answer>") == "<answer>a</answer>"
    assert cut_at_action("<search>a</search><search>b</search>") == "<search>a</search>"
    assert cut_at_action("no tags at all") == "no tags at all"
    assert cut_at_action("stray </answer> text") == "stray </answer>"


def test_cut_then_parse_drops_hallucinated_observation():
    text = "<search>q</search>\n<information>made up</information><answer>wrong</answer>"
    assert parse_action(cut_at_action(text)) == Action("search", "q")


# --- observations ---------------------------------------------------------------------------------------------------


def test_format_observation():
    assert format_observation("  Doc 1: a\nDoc 2: b \n") == "\n\n<information>Doc 1: a\nDoc 2: b</information>\n\n"


def test_observation_that_fits_is_tokenized_whole():
    tokenizer = CharTokenizer()
    ids = observation_token_ids("Doc 1: short", tokenizer, max_obs_tokens=100)
    assert tokenizer.decode(ids) == "\n\n<information>Doc 1: short</information>\n\n"


def test_long_observation_keeps_closing_tag():
    tokenizer = CharTokenizer()
    wrapper_len = len("\n\n<information>") + len("</information>\n\n")  # 15 + 16
    assert wrapper_len == 31
    ids = observation_token_ids("0123456789" * 10, tokenizer, max_obs_tokens=wrapper_len + 12)
    assert len(ids) == 43
    assert tokenizer.decode(ids) == "\n\n<information>012345678901</information>\n\n"


def test_observation_exactly_at_the_limit_is_untouched():
    tokenizer = CharTokenizer()
    ids = observation_token_ids("abc", tokenizer, max_obs_tokens=34)
    assert tokenizer.decode(ids) == "\n\n<information>abc</information>\n\n"
    ids = observation_token_ids("abcd", tokenizer, max_obs_tokens=34)
    assert tokenizer.decode(ids) == "\n\n<information>abc</information>\n\n"


def test_limit_equal_to_wrapper_keeps_only_wrapper():
    tokenizer = CharTokenizer()
    ids = observation_token_ids("anything", tokenizer, max_obs_tokens=31)
    assert tokenizer.decode(ids) == OBSERVATION_HEAD + OBSERVATION_TAIL


def test_limit_smaller_than_wrapper_raises():
    with pytest.raises(ValueError, match="max_obs_tokens=30"):
        observation_token_ids("", CharTokenizer(), max_obs_tokens=30)
