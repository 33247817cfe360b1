"""Dataset loaders: every supported format loads into QAExample, and a broken row names file, row and field."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.dataset import DatasetError, load_qa
from tests.conftest import FIXTURES

DATA = FIXTURES / "data"


def test_zerosearch_parquet_fixture():
    examples = load_qa(DATA / "zerosearch_test.parquet")
    assert [e.data_source for e in examples] == ["nq", "nq", "hotpotqa", "hotpotqa", "bamboogle"]
    assert examples[2].golden_answers == ("Seine", "the Seine")
    assert examples[0].question == "who wrote the novel moby dick"


def test_group_uids_do_not_collide_when_sources_share_an_index():
    # nq and hotpotqa both have extra_info.index 0; the original keyed GRPO groups by that index alone.
    examples = load_qa(DATA / "zerosearch_test.parquet")
    assert examples[0].index == examples[2].index == 0
    assert len({e.uid for e in examples}) == len(examples)


def test_flashrag_jsonl_fixture_takes_its_source_from_the_folder():
    examples = load_qa(DATA / "nq" / "test.jsonl")
    assert len(examples) == 3
    assert {e.data_source for e in examples} == {"nq"}
    assert examples[1].uid == "nq/test/test_1"
    assert examples[1].golden_answers == ("Canberra",)


def test_prompt_messages_use_the_paper_template():
    example = load_qa(DATA / "nq" / "test.jsonl")[0]
    [message] = example.prompt_messages
    assert message["role"] == "user"
    assert message["content"].endswith("Question: who wrote the novel moby dick?\n")


def _write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


GOOD_ROW = {"question": "q?", "golden_answers": ["a"], "data_source": "nq", "extra_info": {"split": "t", "index": 0}}


@pytest.mark.parametrize(
    "broken, field",
    [
        ({"question": None}, "question"),
        ({"question": "  "}, "question"),
        ({"golden_answers": []}, "golden_answers"),
        ({"golden_answers": ["Paris", ""]}, "golden_answers"),
    ],
)
def test_broken_parquet_row_names_file_row_and_field(tmp_path, broken, field):
    path = _write_parquet(tmp_path / "broken.parquet", [GOOD_ROW, dict(GOOD_ROW, **broken), GOOD_ROW])
    with pytest.raises(DatasetError) as err:
        load_qa(path)
    message = str(err.value)
    assert str(path) in message and "row 1" in message and f"'{field}'" in message


def test_parquet_column_of_the_wrong_type_is_named(tmp_path):
    # Parquet columns have one type, so a wrong type shows up in the first row.
    path = _write_parquet(tmp_path / "typed.parquet", [dict(GOOD_ROW, data_source=7), dict(GOOD_ROW, data_source=8)])
    with pytest.raises(DatasetError, match=r"typed\.parquet: row 0: field 'data_source': expected a non-empty string"):
        load_qa(path)


def test_parquet_missing_column_is_named(tmp_path):
    path = _write_parquet(tmp_path / "noq.parquet", [{"golden_answers": ["a"], "data_source": "nq"}])
    with pytest.raises(DatasetError, match=r"noq\.parquet: row 0: missing field 'question'"):
        load_qa(path)


@pytest.mark.parametrize(
    "line, field",
    [
        ({"id": "x", "golden_answers": ["a"]}, "question"),
        ({"id": "x", "question": "q", "golden_answers": []}, "golden_answers"),
        ({"id": "x", "question": "q", "golden_answers": "Paris"}, "golden_answers"),
        ({"id": "x", "question": 3, "golden_answers": ["a"]}, "question"),
        ({"id": "x", "question": "q", "golden_answers": ["a", 5]}, "golden_answers"),
    ],
)
def test_broken_jsonl_row_names_file_row_and_field(tmp_path, line, field):
    path = tmp_path / "broken.jsonl"
    good = {"id": "g", "question": "q", "golden_answers": ["a"]}
    path.write_text("\n".join(json.dumps(r) for r in (good, good, line)) + "\n")
    with pytest.raises(DatasetError) as err:
        load_qa(path)
    message = str(err.value)
    assert str(path) in message and "row 3" in message and f"'{field}'" in message


def test_invalid_json_line_is_reported(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "g", "question": "q", "golden_answers": ["a"]}\n{not json\n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl: row 2: not valid JSON"):
        load_qa(path)


def test_unknown_suffix_is_rejected(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("question\n")
    with pytest.raises(DatasetError, match="unsupported format"):
        load_qa(path)
