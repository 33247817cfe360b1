"""Simulation fine-tuning data (spec section 3): labels, the dataset, its files, and the tuning script's pure parts.

Every expected value is worked out by hand from the hand-made records below; no Ray, no vLLM.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest

from launch import collect_sim_data
from launch.collect_sim_data import build_dataset, final_answer, label_all, records_of
from launch.config import Config
from launch.tune_simulator import STATE_FILE, batch_indices, latest_checkpoint, sft_sample, target_nll
from simulator.server import chat_prompt_ids
from simulator.templates import SFT_NOISY_TEMPLATE, SFT_USEFUL_TEMPLATE, build_simulator_prompt
from simulator.tuning_data import (
    NOISY,
    USEFUL,
    SearchRecord,
    balance,
    dedupe,
    judge_prompt,
    label_counts,
    label_rule,
    label_v1,
    parse_judgement,
    read_records,
    read_sft_examples,
    record_rows,
    sft_example,
    split_of,
    usable,
    write_jsonl,
)

END_OF_TURN = "<|im_end|>\n"  # what SmolLM2's chat template writes after an assistant message (checked below)


def rec(question="What is the capital of France?", golds=("Paris",), query="capital of france",
        documents=("Paris is the capital of France.",), correct=True, final="Paris", label="", split="",
        **extra) -> SearchRecord:
    return SearchRecord(question=question, golden_answers=list(golds), query=query, documents=list(documents),
                        final_answer=final, correct=correct, label=label, split=split, **extra)


def config(**collect) -> Config:
    cfg = Config()
    for key, value in collect.items():
        setattr(cfg.simulation.collect, key, value)
    return cfg


# --- labels ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "correct, documents, expected",
    [
        (True, ["Paris is the capital of France."], USEFUL),
        (True, ["Nothing about the answer here."], USEFUL),  # the outcome labels it, not the documents
        (True, [], USEFUL),
        (False, ["Paris is the capital of France."], NOISY),
        (False, ["Nothing about the answer here."], NOISY),
    ],
)
def test_label_v1_follows_the_episode_outcome(correct, documents, expected):
    assert label_v1(rec(correct=correct, documents=documents)) == expected


@pytest.mark.parametrize(
    "documents, golds, expected",
    [
        (["The capital of France is PARIS."], ["Paris"], USEFUL),  # case
        (["Its capital: Paris!"], ["paris."], USEFUL),  # punctuation on both sides
        (["It was the Eiffel Tower, finished in 1889."], ["The Eiffel Tower"], USEFUL),  # article dropped
        (["An eiffel tower replica"], ["the Eiffel Tower"], USEFUL),
        (["She lives in New York City."], ["New York"], USEFUL),  # a run of whole words inside a longer name
        (["Parisian cafes are famous."], ["Paris"], NOISY),  # part of a word
        (["Comparison shopping"], ["Paris"], NOISY),  # inside a word
        (["New Yorker magazine"], ["New York"], NOISY),  # last word partial
        (["York, New"], ["New York"], NOISY),  # both words, wrong order
        (["He wrote Hamlet in 1600."], ["Macbeth", "hamlet"], USEFUL),  # any gold counts
        (["Nothing here.", "Still nothing.", "Hamlet again"], ["Macbeth", "Hamlet"], USEFUL),  # any document counts
        (["Nothing here.", "Still nothing."], ["Macbeth", "Othello"], NOISY),
        ([], ["Paris"], NOISY),  # no documents
        (["The answer is anything."], [""], NOISY),  # an empty gold matches nothing
        (["The answer is anything."], ["The"], NOISY),  # a gold that normalizes to "" matches nothing
    ],
)
def test_label_rule_whole_words_after_normalization(documents, golds, expected):
    # correct=True throughout: the rule must ignore the outcome
    assert label_rule(rec(documents=documents, golds=golds, correct=True)) == expected


def test_label_rule_ignores_the_outcome():
    assert label_rule(rec(documents=["Paris is nice"], correct=False)) == USEFUL
    assert label_rule(rec(documents=["Lyon is nice"], correct=True)) == NOISY


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("Yes.", USEFUL),
        (" yes, they do", USEFUL),
        ("YES", USEFUL),
        ("\n\nYes", USEFUL),
        ("NO", NOISY),
        ("no.", NOISY),
        ("No, the results do not mention it.", NOISY),
        ("maybe", None),
        ("", None),
        (None, None),
        ("   ", None),
        ("Yesterday", None),  # first word must be exactly yes or no
        ("I think yes", None),
        ("Nope", None),
    ],
)
def test_parse_judgement(reply, expected):
    assert parse_judgement(reply) == expected


def test_judge_prompt_holds_question_golds_query_and_documents():
    record = rec(question="Who wrote Hamlet?", golds=["William Shakespeare", "Shakespeare"], query="hamlet author",
                 documents=["Hamlet\nA tragedy by   William Shakespeare.", "The Globe Theatre"])
    prompt = judge_prompt(record)
    lines = prompt.splitlines()
    assert "Question: Who wrote Hamlet?" in lines
    assert "William Shakespeare" in prompt and "Shakespeare" in prompt
    assert "Correct answer: William Shakespeare / Shakespeare" in lines
    assert "Search query: hamlet author" in lines
    # the documents as the policy reads them: one "Doc i:" line each, whitespace collapsed
    assert "Doc 1: Hamlet A tragedy by William Shakespeare." in lines
    assert "Doc 2: The Globe Theatre" in lines
    assert lines.index("Doc 1: Hamlet A tragedy by William Shakespeare.") + 1 == lines.index("Doc 2: The Globe Theatre")
    assert "Doc 3:" not in prompt


def four_records() -> list[SearchRecord]:
    """v1 and rule agree on 3 of the 4 (the third: a right answer from documents without it)."""
    return [
        rec(correct=True, documents=["Paris is the capital."], label=NOISY),  # v1 useful, rule useful
        rec(correct=False, documents=["Lyon is a city."]),  # noisy, noisy
        rec(correct=True, documents=["Lyon is a city."]),  # useful, noisy
        rec(correct=False, documents=["Parisian cafes."], label=USEFUL),  # noisy, noisy
    ]


def test_label_all_v1():
    records = four_records()
    report = label_all(config(label="v1"), records)
    assert [r.label for r in records] == [USEFUL, NOISY, USEFUL, NOISY]
    assert report == {"rule": "v1", "unlabelled": 0, "v1_rule_agreement": 0.75}


def test_label_all_rule():
    records = four_records()
    report = label_all(config(label="rule"), records)
    assert [r.label for r in records] == [USEFUL, NOISY, NOISY, NOISY]
    assert report == {"rule": "rule", "unlabelled": 0, "v1_rule_agreement": 0.75}


def test_label_all_agreement_is_rounded():
    records = four_records()[1:]  # 2 of 3 agree
    assert label_all(config(label="v1"), records)["v1_rule_agreement"] == 0.667


def test_label_all_unknown_rule_names_the_setting():
    records = four_records()
    with pytest.raises(ValueError, match=r"simulation\.collect\.label='judge'"):
        label_all(config(label="judge"), records)
    assert [r.label for r in records] == [NOISY, "", "", USEFUL]  # untouched


def test_label_all_llm_uses_the_judge(monkeypatch):
    calls = []

    def fake_judge(cfg, records):
        calls.append((cfg, records))
        return [NOISY, None, USEFUL, None]

    monkeypatch.setattr(collect_sim_data, "judge", fake_judge)
    cfg = config(label="llm")
    records = four_records()
    report = label_all(cfg, records)
    assert len(calls) == 1 and calls[0][0] is cfg and calls[0][1] is records
    # the last record was labelled useful before: a judge that could not decide leaves it unlabelled
    assert [r.label for r in records] == [NOISY, "", USEFUL, ""]
    assert report == {"rule": "llm", "unlabelled": 2, "v1_rule_agreement": 0.75}


# --- the dataset -------------------------------------------------------------------------------------------------


def test_split_of_deterministic_and_order_independent():
    questions = [f"question number {i}?" for i in range(200)]
    forward = {q: split_of(q, 0.3) for q in questions}
    backward = {q: split_of(q, 0.3) for q in reversed(questions)}
    assert forward == backward
    assert forward == {q: split_of(q, 0.3) for q in questions}
    assert set(forward.values()) == {"train", "val"}
    assert all(split_of(f"  {q}\n", 0.3) == forward[q] for q in questions)  # surrounding whitespace ignored


def test_split_of_val_share_and_nesting():
    questions = [f"question number {i}?" for i in range(2000)]
    val = {q for q in questions if split_of(q, 0.25) == "val"}
    assert 0.2 <= len(val) / len(questions) <= 0.3
    # a larger share only adds questions to val (a threshold on one hash)
    val_half = {q for q in questions if split_of(q, 0.5) == "val"}
    assert val < val_half
    assert 0.45 <= len(val_half) / len(questions) <= 0.55


def test_split_of_zero_fraction_is_all_train():
    assert {split_of(f"q{i}", 0.0) for i in range(500)} == {"train"}


@pytest.mark.parametrize("fraction", [1.0, 1.5, -0.1])
def test_split_of_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        split_of("q", fraction)


def test_dedupe_keeps_first_of_question_query_label():
    a = rec(question="Q1", query="Capital of France", label=USEFUL, documents=["first"])
    b = rec(question="Q1", query="  capital   OF\tfrance ", label=USEFUL, documents=["second"])  # same as a
    c = rec(question="Q1", query="capital of france", label=NOISY)  # other label: kept
    d = rec(question="Q2", query="capital of france", label=USEFUL)  # other question: kept
    e = rec(question="Q1", query="capital of germany", label=USEFUL)  # other query: kept
    f = rec(question="Q1", query="CAPITAL OF FRANCE", label=NOISY)  # same as c
    g = rec(question="Q1", query="capital of  france", label=USEFUL, documents=["third"])  # same as a
    kept = dedupe(iter([a, b, c, d, e, f, g]))  # any iterable
    assert len(kept) == 4
    assert all(x is y for x, y in zip(kept, [a, c, d, e]))


def balance_input() -> list[SearchRecord]:
    """Train: 5 useful, 2 noisy; val: 1 useful, 3 noisy; the splits interleaved."""
    layout = [("train", USEFUL), ("val", NOISY), ("train", NOISY), ("train", USEFUL), ("val", USEFUL),
              ("train", USEFUL), ("val", NOISY), ("train", USEFUL), ("train", NOISY), ("val", NOISY),
              ("train", USEFUL)]
    return [rec(query=f"query {i}", split=split, label=label) for i, (split, label) in enumerate(layout)]


def test_balance_equal_counts_per_split_from_the_input_in_order():
    records = balance_input()
    before = [(r.query, r.split, r.label) for r in records]
    chosen = balance(records, seed=0)
    assert [(r.query, r.split, r.label) for r in records] == before  # input untouched
    assert label_counts(chosen) == {"train": {USEFUL: 2, NOISY: 2}, "val": {USEFUL: 1, NOISY: 1}}
    position = {id(r): i for i, r in enumerate(records)}
    assert all(id(r) in position for r in chosen)  # the input's own objects
    assert len({id(r) for r in chosen}) == len(chosen)  # none twice
    # the smaller class is kept whole
    assert {r.query for r in chosen if r.split == "train" and r.label == NOISY} == {"query 2", "query 8"}
    assert {r.query for r in chosen if r.split == "val" and r.label == USEFUL} == {"query 4"}
    for split in ("train", "val"):
        order = [position[id(r)] for r in chosen if r.split == split]
        assert order == sorted(order)


def test_balance_deterministic_per_seed():
    records = balance_input()

    def picked(seed):
        return [r.query for r in balance(records, seed=seed)]

    assert picked(0) == picked(0)
    assert picked(7) == picked(7)
    # train picks 2 of 5 useful and val 1 of 3 noisy: 30 outcomes, so ten seeds cannot all agree by chance
    assert len({tuple(picked(seed)) for seed in range(10)}) > 1


def test_balance_split_without_one_class_is_dropped():
    records = [rec(query="a", split="train", label=USEFUL), rec(query="b", split="train", label=USEFUL),
               rec(query="c", split="val", label=NOISY), rec(query="d", split="val", label=USEFUL)]
    assert [r.query for r in balance(records)] == ["c", "d"]


def build_input() -> list[SearchRecord]:
    return [
        rec(question="Q1", query="q a", label=USEFUL),  # kept
        rec(question="Q1", query="   ", label=USEFUL),  # empty query
        rec(question="Q2", query="q x", documents=[], label=NOISY),  # no documents
        rec(question="Q3", query="q y", golds=[], label=USEFUL),  # no gold answers
        rec(question="Q3", query="q z", label=""),  # unlabelled
        rec(question="Q2", query="q b", label=NOISY),  # kept
        rec(question="Q3", query="q c", label=USEFUL),  # kept
        rec(question="Q1", query="Q  A", label=USEFUL),  # duplicate of the first
        rec(question="Q1", query="q a", label=NOISY),  # kept: the same query with the other label
        rec(question="Q4", query="q w", label="maybe"),  # not a label
        rec(question="Q4", query="q d", label=USEFUL),  # kept
    ]


def test_usable():
    assert usable(rec())
    assert not usable(rec(query=" \n"))
    assert not usable(rec(documents=[]))
    assert not usable(rec(golds=[]))


def test_build_dataset_counts_by_hand():
    records = build_input()
    chosen, counts = build_dataset(config(val_fraction=0.0, balance=True), records)
    zero = {USEFUL: 0, NOISY: 0}
    assert counts == {"kept": 5, "before_balance": {"train": {USEFUL: 3, NOISY: 2}, "val": zero},
                      "dataset": {"train": {USEFUL: 2, NOISY: 2}, "val": zero}}
    assert len(chosen) == 4 and all(r.split == "train" for r in chosen)
    kept_ids = {id(records[i]) for i in (0, 5, 6, 8, 10)}
    assert {id(r) for r in chosen} <= kept_ids
    assert {id(r) for r in chosen if r.label == NOISY} == {id(records[5]), id(records[8])}


def test_build_dataset_without_balance_keeps_every_usable_record():
    records = build_input()
    chosen, counts = build_dataset(config(val_fraction=0.0, balance=False), records)
    assert [id(r) for r in chosen] == [id(records[i]) for i in (0, 5, 6, 8, 10)]
    assert counts["kept"] == 5
    assert counts["dataset"] == counts["before_balance"] == {"train": {USEFUL: 3, NOISY: 2},
                                                             "val": {USEFUL: 0, NOISY: 0}}
    # dropped records get no split
    assert [records[i].split for i in (1, 2, 3, 4, 7, 9)] == [""] * 6


def test_build_dataset_splits_by_question():
    records = [rec(question=f"question {i}", query=f"q {i} {j}", label=(USEFUL, NOISY)[j])
               for i in range(40) for j in range(2)]
    chosen, counts = build_dataset(config(val_fraction=0.5, balance=True), records)
    assert all(r.split == split_of(r.question, 0.5) for r in records)
    # both records of a question share a split, one of each label, so every split is balanced already
    assert len(chosen) == 80 and counts["kept"] == 80
    n_val = sum(split_of(f"question {i}", 0.5) == "val" for i in range(40))
    assert 0 < n_val < 40
    assert counts["dataset"] == {"train": {USEFUL: 40 - n_val, NOISY: 40 - n_val}, "val": {USEFUL: n_val, NOISY: n_val}}


@pytest.mark.parametrize("label, template, keyword", [(USEFUL, SFT_USEFUL_TEMPLATE, "Useful Output:\n"),
                                                       (NOISY, SFT_NOISY_TEMPLATE, "Noisy Output:\n")])
def test_sft_example(label, template, keyword):
    record = rec(question="What is the capital of France?", golds=["Paris", "City of Light"],
                 query="france capital city", label=label,
                 documents=["Paris\nParis is the  capital\tof France.", "  Lyon \n\n A city on the Rhône. "])
    example = sft_example(record)
    assert example["prompt"] == build_simulator_prompt("france capital city", "What is the capital of France?",
                                                       "Paris", label == USEFUL, "sft")
    assert example["prompt"] == template.format(problem="What is the capital of France?", ground_truth="Paris",
                                                query="france capital city")
    assert example["prompt"].endswith("Query: france capital city\n" + keyword)
    other = "Noisy Output:" if label == USEFUL else "Useful Output:"
    assert other not in example["prompt"]
    assert 'question: "What is the capital of France?" whose answer is Paris.' in example["prompt"]
    assert "City of Light" not in example["prompt"]  # only the first gold answer
    assert example["completion"] == "Doc 1: Paris Paris is the capital of France.\nDoc 2: Lyon A city on the Rhône."
    assert example["label"] == label
    assert example["query"] == "france capital city"
    assert example["question"] == "What is the capital of France?"
    assert example["golden_answers"] == ["Paris", "City of Light"]


@pytest.mark.parametrize("label", ["", "maybe"])
def test_sft_example_needs_a_label(label):
    with pytest.raises(ValueError, match="not labelled"):
        sft_example(rec(label=label))


def trajectory(response_text, golds=("Paris",), queries=(), documents=()):
    return SimpleNamespace(response_text=response_text, golden_answers=list(golds),
                           stats=SimpleNamespace(queries=list(queries), documents=[list(d) for d in documents]))


def test_records_of_one_record_per_search():
    traj = trajectory(
        "<think>find it</think><search> capital of france </search>"
        "<information>Doc 1: <answer> Lyon </answer></information>"  # not the policy's answer
        "<search>paris population</search><information>Doc 1: 2 million</information>"
        "<answer> The city of Paris </answer>",
        golds=["Paris", "Paname"],
        queries=["capital of france", "paris population"],
        documents=[["Paris is the capital.", "France is in Europe."], ["2 million people"]],
    )
    records = records_of(traj, "train_7", "What is the capital of France?", sample=1, engine="bm25")
    assert len(records) == 2
    for turn, r in enumerate(records):
        assert r.turn == turn
        assert r.question == "What is the capital of France?"
        assert r.question_id == "train_7" and r.sample == 1 and r.engine == "bm25"
        assert r.golden_answers == ["Paris", "Paname"]
        assert r.final_answer == "The city of Paris"
        assert r.correct is True  # "paris" is inside "city of paris"
        assert r.label == "" and r.split == ""
    assert [r.query for r in records] == ["capital of france", "paris population"]
    assert records[0].documents == ["Paris is the capital.", "France is in Europe."]
    assert records[1].documents == ["2 million people"]
    assert records[0].documents is not traj.stats.documents[0]  # a copy


@pytest.mark.parametrize(
    "response, golds, answer, correct",
    [
        ("<answer>Paris, France</answer>", ["Paris"], "Paris, France", True),  # gold inside the prediction
        ("<answer>PARIS.</answer>", ["paris"], "PARIS.", True),
        ("<answer>Par</answer>", ["Paris"], "Par", False),  # prediction inside the gold does not count
        ("<answer>Paris</answer>", ["Paris France"], "Paris", False),
        ("<answer>Paris</answer> then <answer>Lyon</answer>", ["Paris"], "Lyon", False),  # the last answer
        ("<answer>Lyon</answer> then <answer>Paris</answer>", ["Paris"], "Paris", True),
        ("<answer>Lyon</answer>", ["Marseille", "lyon"], "Lyon", True),  # any gold
        ("<search>capital</search><information>Paris</information>", ["Paris"], None, False),  # never answered
        ("<answer>Paris", ["Paris"], None, False),  # unclosed
    ],
)
def test_final_answer_subem(response, golds, answer, correct):
    assert final_answer(trajectory(response, golds=golds)) == (answer, correct)


def test_records_of_without_answer_or_searches():
    traj = trajectory("<search>capital</search><information>Doc 1: Paris</information>I give up.",
                      queries=["capital"], documents=[["Paris"]])
    [record] = records_of(traj, "q", "Q?", 0, "bm25")
    assert record.final_answer is None and record.correct is False
    assert label_v1(record) == NOISY
    assert records_of(trajectory("<answer>Paris</answer>"), "q", "Q?", 0, "bm25") == []


# --- files -------------------------------------------------------------------------------------------------------


def test_records_round_trip(tmp_path):
    records = [rec(question="Où est la tour Eiffel?", golds=["Paris", "París"], documents=["Paris\nRhône", "b"],
                   label=USEFUL, split="val", question_id="t1", sample=2, turn=3, engine="bm25"),
               rec(final=None, correct=False, documents=[], label="", split="")]
    path = write_jsonl(tmp_path / "new" / "records.jsonl", record_rows(records))
    assert path == tmp_path / "new" / "records.jsonl"
    assert "Rhône" in path.read_text()  # not escaped
    assert [p.name for p in path.parent.iterdir()] == ["records.jsonl"]  # no temporary file left
    assert read_records(path) == records


def test_write_jsonl_replaces(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"a": 1}, {"a": 2}])
    write_jsonl(path, [{"b": 3}])
    assert path.read_text() == '{"b": 3}\n'


def test_read_records_missing_key_names_file_line_and_key(tmp_path):
    rows = record_rows([rec(), rec()])
    del rows[1]["correct"]
    path = write_jsonl(tmp_path / "records.jsonl", rows)
    with pytest.raises(ValueError, match=r"records\.jsonl, line 2: missing keys \['correct'\]"):
        read_records(path)


def sft_rows(n=2):
    return [sft_example(rec(query=f"query {i}", label=(USEFUL, NOISY)[i % 2])) for i in range(n)]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_read_sft_examples_valid(tmp_path):
    rows = sft_rows(3)
    path = write_jsonl(tmp_path / "sft_train.jsonl", rows)
    assert read_sft_examples(path) == rows


def test_read_sft_examples_invalid_json(tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", [json.dumps(sft_rows(1)[0]), '{"prompt": "x",'])
    with pytest.raises(ValueError, match="not valid JSON") as info:
        read_sft_examples(path)
    assert f"{path}, line 2" in str(info.value)


def test_read_sft_examples_missing_key(tmp_path):
    rows = sft_rows(2)
    del rows[1]["completion"]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    with pytest.raises(ValueError, match=r"missing keys \['completion'\]") as info:
        read_sft_examples(path)
    assert f"{path}, line 2" in str(info.value)


def test_read_sft_examples_bad_label(tmp_path):
    rows = sft_rows(2)
    rows[0]["label"] = "relevant"
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    with pytest.raises(ValueError, match="label 'relevant'") as info:
        read_sft_examples(path)
    assert f"{path}, line 1" in str(info.value)


def test_read_sft_examples_empty_completion_and_non_object(tmp_path):
    rows = sft_rows(1)
    rows[0]["completion"] = ""
    path = write_jsonl(tmp_path / "empty_completion.jsonl", rows)
    with pytest.raises(ValueError, match="non-empty strings"):
        read_sft_examples(path)
    path = write_lines(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match="line 1: expected a JSON object, got list"):
        read_sft_examples(path)
    path = write_lines(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="no examples"):
        read_sft_examples(path)


@pytest.mark.parametrize("reader", [read_records, read_sft_examples])
def test_missing_file_names_the_path(tmp_path, reader):
    path = tmp_path / "nowhere" / "sft_train.jsonl"
    with pytest.raises(FileNotFoundError) as info:
        reader(path)
    assert str(path) in str(info.value)


# --- launch.tune_simulator ---------------------------------------------------------------------------------------


PROMPT = build_simulator_prompt("capital of france", "What is the capital of France?", "Paris", True, "sft")
COMPLETION = ("Doc 1: Paris is the capital and most populous city of France.\n"
              "Doc 2: Lyon is the third-largest city of France, on the Rhône.")


def test_smollm2_template_ends_an_assistant_message_with_im_end(tokenizer):
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": PROMPT}]
    head = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": COMPLETION}], tokenize=False)
    assert head == f"<|im_start|>system\n<|im_end|>\n<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    assert full == head + COMPLETION + END_OF_TURN


def test_sft_sample_prompt_target_and_mask(tokenizer):
    sample = sft_sample(tokenizer, PROMPT, COMPLETION, max_target_tokens=320)
    prompt_ids = chat_prompt_ids(tokenizer, PROMPT)
    assert sample.prompt_len == len(prompt_ids)
    assert sample.input_ids[:sample.prompt_len] == prompt_ids
    assert len(sample.loss_mask) == len(sample.input_ids) - sample.prompt_len
    assert set(sample.loss_mask) == {1}
    target = sample.input_ids[sample.prompt_len:]
    assert tokenizer.decode(target, skip_special_tokens=False) == COMPLETION + END_OF_TURN
    assert target[-2:] == [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer("\n")["input_ids"][0]]
    prefix = tokenizer.decode(sample.input_ids[:sample.prompt_len], skip_special_tokens=False)
    assert prefix.endswith("<|im_start|>assistant\n")
    assert prefix == f"<|im_start|>system\n<|im_end|>\n<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    assert sample.advantages == [] and sample.old_logprobs == []


def test_sft_sample_cuts_the_completion_not_the_end_of_turn(tokenizer):
    sample = sft_sample(tokenizer, PROMPT, COMPLETION, max_target_tokens=10)
    target = sample.input_ids[sample.prompt_len:]
    assert len(target) == 10 and sample.loss_mask == [1] * 10
    text = tokenizer.decode(target, skip_special_tokens=False)
    assert text.endswith(END_OF_TURN)
    kept = text[:-len(END_OF_TURN)]
    assert kept and COMPLETION.startswith(kept) and len(kept) < len(COMPLETION)
    assert target[:8] == tokenizer(COMPLETION, add_special_tokens=False)["input_ids"][:8]
    assert sample.input_ids[:sample.prompt_len] == chat_prompt_ids(tokenizer, PROMPT)


def test_sft_sample_without_chat_template_ends_with_eos(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    sample = sft_sample(plain, PROMPT, COMPLETION, max_target_tokens=320)
    assert sample.input_ids[:sample.prompt_len] == plain(PROMPT, add_special_tokens=False)["input_ids"]
    target = sample.input_ids[sample.prompt_len:]
    assert target == plain(COMPLETION, add_special_tokens=False)["input_ids"] + [plain.eos_token_id]
    assert sample.loss_mask == [1] * len(target)


def test_batch_indices_epochs_are_permutations():
    first = batch_indices(10, 5, 1, seed=0) + batch_indices(10, 5, 2, seed=0)
    second = batch_indices(10, 5, 3, seed=0) + batch_indices(10, 5, 4, seed=0)
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert first != list(range(10))  # shuffled
    assert first != second  # each epoch its own order


def test_batch_indices_deterministic_and_seeded():
    assert batch_indices(10, 5, 3, seed=4) == batch_indices(10, 5, 3, seed=4)
    assert batch_indices(10, 10, 1, seed=0) != batch_indices(10, 10, 1, seed=1)


def test_batch_indices_wrap_into_the_next_epoch():
    steps = [batch_indices(10, 4, step, seed=2) for step in range(1, 6)]  # 20 indices: exactly two epochs
    assert all(len(s) == 4 for s in steps)
    stream = [i for s in steps for i in s]
    assert sorted(stream[:10]) == list(range(10))  # steps 1, 2 and the first half of step 3
    assert sorted(stream[10:]) == list(range(10))  # the rest of step 3, steps 4 and 5
    assert set(steps[2][:2]).isdisjoint(steps[0] + steps[1])  # step 3 opens with epoch 0's last two
    # a batch larger than the dataset spans several epochs
    big = batch_indices(3, 7, 1, seed=0)
    assert sorted(big[:3]) == sorted(big[3:6]) == [0, 1, 2] and big[6] in (0, 1, 2)


def test_batch_indices_stream_does_not_depend_on_batch_size():
    by_one = [batch_indices(7, 1, step, seed=5)[0] for step in range(1, 22)]
    by_three = [i for step in range(1, 8) for i in batch_indices(7, 3, step, seed=5)]
    assert by_one == by_three


def test_batch_indices_needs_examples():
    with pytest.raises(ValueError, match="no training examples"):
        batch_indices(0, 2, 1, seed=0)


@pytest.mark.parametrize(
    "logprobs, masks, expected",
    [
        ([[-1.0, -3.0], [-2.0]], [[1, 0], [1]], 1.5),
        ([[-0.5, -1.5, -1.0]], [[1, 1, 1]], 1.0),
        ([[-4.0, -1.0], [-2.0, -6.0]], [[0, 1], [1, 1]], 3.0),  # (1 + 2 + 6) / 3
        ([[-1.0]], [[0]], 0.0),  # nothing to score
    ],
)
def test_target_nll(logprobs, masks, expected):
    samples = [SimpleNamespace(loss_mask=m) for m in masks]
    assert target_nll(logprobs, samples) == pytest.approx(expected)


def write_state(folder, step):
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text(json.dumps({"step": step, "losses": [], "val_losses": {}}))


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    write_state(tmp_path / "step_9", 9)
    write_state(tmp_path / "step_10", 10)  # newer than step_9, though "step_10" < "step_9" as text
    write_state(tmp_path / "step_5", 5)
    (tmp_path / "step_40" / "learner").mkdir(parents=True)  # interrupted: no state file
    (tmp_path / "step_60").mkdir()
    (tmp_path / "step_60" / f".{STATE_FILE}.tmp").write_text(json.dumps({"step": 60}))  # written, not renamed
    assert latest_checkpoint(tmp_path) == (10, tmp_path / "step_10")


def test_blank_lines_are_skipped(tmp_path):
    rows = sft_rows(2)
    path = write_lines(tmp_path / "sft.jsonl", ["", json.dumps(rows[0]), "   ", json.dumps(rows[1]), ""])
    assert read_sft_examples(path) == rows


def test_read_records_error_names_the_file_line_after_a_blank_line(tmp_path):
    rows = record_rows([rec(), rec()])
    del rows[1]["correct"]
    path = write_lines(tmp_path / "records.jsonl", [json.dumps(rows[0]), "", json.dumps(rows[1])])
    with pytest.raises(ValueError, match=r"records\.jsonl, line 3: missing keys \['correct'\]"):
        read_records(path)
