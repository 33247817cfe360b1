"""Answer extraction and QA metrics, against values worked out by hand."""

import pytest

from actors.protocol import INVALID_ACTION_MESSAGE, make_prefix
from actors.reward import (
    exact_match,
    extract_answer,
    f1_score,
    normalize_answer,
    score_response,
    substring_match,
)


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("The Beatles", "beatles"),
        ("Beatles!", "beatles"),
        ("  A  tale of   two cities. ", "tale of two cities"),
        ("an apple, the pear", "apple pear"),
        ("Theatre", "theatre"),  # "the" only as a whole word
        ("U.S.A.", "usa"),
        ("rock'n'roll", "rocknroll"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


# --- extraction -----------------------------------------------------------------------------------------------------


def test_extract_last_complete_answer():
    response = "<answer> first </answer> hmm <answer>\n second\n</answer> <answer>unterminated"
    assert extract_answer(response) == "second"


def test_extract_none_without_answer():
    assert extract_answer("<think>no idea</think>") is None
    assert extract_answer("Paris</answer>") is None
    assert extract_answer("") is None


def test_prompt_answers_are_not_counted():
    # The prompt holds "<answer> and </answer>" and "<answer> Beijing </answer>"; the original scored those.
    prompt_and_response = make_prefix("capital of china") + "<think>I do not know</think>"
    assert extract_answer(prompt_and_response) is None
    assert score_response(prompt_and_response, ["Beijing"]) == 0.0
    assert extract_answer(make_prefix("capital of china") + "<answer>Beijing</answer>") == "Beijing"


def test_observations_are_not_counted():
    response = (
        "<answer bad" + INVALID_ACTION_MESSAGE + "<search>q</search>\n\n<information>Doc 1: <answer>Paris</answer>"
        "</information>\n\n"
    )
    assert extract_answer(response) is None
    assert extract_answer(response + "<answer>Lyon</answer>") == "Lyon"


# --- metrics --------------------------------------------------------------------------------------------------------


def test_exact_match():
    assert exact_match("the Beatles", ["Beatles!"]) == 1.0
    assert exact_match("The Beatles band", ["Beatles"]) == 0.0
    assert exact_match("Ringo", ["John", "ringo."]) == 1.0
    assert isinstance(exact_match("x", ["y"]), float)


def test_substring_match_is_the_papers_em():
    assert substring_match("The Beatles band", ["Beatles"]) == 1.0
    assert substring_match("Beatles", ["The Beatles band"]) == 0.0
    assert substring_match("Paul McCartney", ["Lennon", "mccartney"]) == 1.0
    assert substring_match("anything", [""]) == 0.0  # an empty gold would otherwise match everything


def test_f1_partial_overlap():
    # "red fox" vs "red dog": 1 common token, P = R = 1/2.
    assert f1_score("the red fox", ["red dog"]) == pytest.approx(0.5)
    # "new york city" vs "york": P = 1/3, R = 1, F1 = 2 * (1/3) / (4/3) = 0.5.
    assert f1_score("New York City", ["York"]) == pytest.approx(0.5)
    # "barack obama" vs "obama": P = 1/2, R = 1, F1 = 2/3.
    assert f1_score("Barack Obama", ["Obama"]) == pytest.approx(2 / 3)


def test_f1_takes_best_gold():
    assert f1_score("red fox", ["blue whale", "red dog", "red fox."]) == pytest.approx(1.0)
    assert f1_score("red fox", ["blue whale", "red dog"]) == pytest.approx(0.5)


def test_f1_counts_duplicate_tokens_as_a_multiset():
    # pred "paris paris paris" vs gold "paris": overlap 1, P = 1/3, R = 1, F1 = 0.5 (a set would give 1.0).
    assert f1_score("paris paris paris", ["paris"]) == pytest.approx(0.5)
    # pred "a b b" -> "b b" vs gold "b b c": overlap 2, P = 1, R = 2/3, F1 = 0.8.
    assert f1_score("a b b", ["b b c"]) == pytest.approx(0.8)


def test_f1_no_overlap_and_empty():
    assert f1_score("London", ["Paris"]) == 0.0
    assert f1_score("", ["Paris"]) == 0.0
    assert f1_score("the", ["Paris"]) == 0.0  # normalizes to nothing
    assert f1_score("Paris", []) == 0.0


def test_a_single_string_gold_is_one_answer():
    # Iterating "red dog" character by character would match nothing in "red".
    assert f1_score("red", "red dog") == pytest.approx(2 / 3)
    assert exact_match("red dog", "red dog") == 1.0


# --- reward ---------------------------------------------------------------------------------------------------------


def test_score_response_metrics():
    response = "<think>t</think><search>q</search>\n\n<information>d</information>\n\n<answer>The red fox</answer>"
    assert score_response(response, ["red dog"]) == pytest.approx(0.5)
    assert score_response(response, ["red dog"], metric="exact_match") == 0.0
    assert score_response(response, ["Red Fox"], metric="exact_match") == 1.0
    assert score_response(response, ["fox"], metric="substring_match") == 1.0


def test_no_answer_scores_zero():
    assert score_response("<search>q</search>", ["q"]) == 0.0
    assert score_response("<search>q</search>", ["q"], metric="substring_match") == 0.0


def test_unknown_metric_names_choices():
    with pytest.raises(ValueError, match="exact_match.*f1.*substring_match"):
        score_response("<answer>x</answer>", ["x"], metric="em")


def test_even_token_share_counts_the_policys_own_tokens_only():
    from actors.reward import even_token_share

    # Sampled: 2, 3, 4 (two even of three); the observation tokens 6 and 8 (mask 0) do not count.
    assert even_token_share([2, 3, 6, 8, 4], [1, 1, 0, 0, 1]) == pytest.approx(2 / 3)
    assert even_token_share([6, 8], [0, 0]) == 0.0
