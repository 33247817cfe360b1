"""The synthetic search world: deterministic, in the ZeroSearch schema, and consistent with its own corpus."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pyarrow.parquet as pq

from actors.dataset import load_qa
from actors.protocol import make_prefix
from launch.synthetic_world import (
    assign_splits,
    build_world,
    single_hop_questions,
    two_hop_questions,
    write_world,
)
from tests.conftest import REPO_ROOT


def _bytes(paths):
    return {name: path.read_bytes() for name, path in paths.items()}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    a = write_world(tmp_path / "a", seed=11, entities=40)
    b = write_world(tmp_path / "b", seed=11, entities=40)
    c = write_world(tmp_path / "c", seed=12, entities=40)
    assert _bytes(a) == _bytes(b)
    for name in ("corpus", "train", "test"):
        assert _bytes(a)[name] != _bytes(c)[name]


def test_cli_writes_the_four_files(tmp_path):
    out = tmp_path / "w"
    cmd = [sys.executable, "-m", "launch.prepare_data", "synthetic", "--out", str(out), "--seed", "7",
           "--entities", "32"]
    subprocess.run(cmd, check=True, cwd=REPO_ROOT, capture_output=True, timeout=120)
    assert sorted(p.name for p in out.iterdir()) == ["corpus.jsonl", "test.parquet", "train.parquet", "val.parquet"]


def test_parquet_schema_matches_zerosearch(synthetic_world):
    table = pq.read_table(synthetic_world["train"])
    assert set(table.column_names) >= {"data_source", "prompt", "ability", "reward_model", "extra_info", "question",
                                       "golden_answers", "id"}
    row = table.slice(0, 1).to_pylist()[0]
    assert row["prompt"] == [{"role": "user", "content": make_prefix(row["question"])}]
    assert row["ability"] == "fact-reasoning"
    assert row["reward_model"] == {"style": "rule", "ground_truth": {"target": row["golden_answers"]}}
    assert row["extra_info"]["split"] == "train" and row["extra_info"]["index"] == 0
    assert row["data_source"] in ("synthetic_1hop", "synthetic_2hop")


def test_uids_are_unique_across_splits(synthetic_world):
    uids = [e.uid for split in ("train", "val", "test") for e in load_qa(synthetic_world[split])]
    assert len(uids) == len(set(uids))


def test_splits_never_share_a_subject_entity():
    world = build_world(3, 64)
    splits = assign_splits(single_hop_questions(world) + two_hop_questions(world), random.Random(0))
    subjects = {split: {q.subject for q in questions} for split, questions in splits.items()}
    assert all(subjects.values())
    assert not subjects["train"] & subjects["test"]
    assert not subjects["train"] & subjects["val"]
    assert not subjects["val"] & subjects["test"]


def test_every_single_hop_answer_is_written_in_the_subject_passages(synthetic_world):
    corpus = [json.loads(line)["contents"] for line in synthetic_world["corpus"].read_text().splitlines()]
    for example in load_qa(synthetic_world["test"]):
        if example.data_source != "synthetic_1hop":
            continue
        subject_passages = [c for c in corpus if c.split("\n", 1)[1].count(example.golden_answers[0])
                            and any(word in c for word in example.question.split()[-2:])]
        assert subject_passages, example


def test_two_hop_answers_follow_the_world():
    world = build_world(5, 32)
    for q in two_hop_questions(world):
        if q.question.startswith("Who founded the company that "):
            person = world.person(q.subject)
            assert q.answer == world.company(person.employer).founder
        if q.question.startswith("In which country was "):
            assert q.answer == world.city(world.person(q.subject).birthplace).country


def test_entity_names_are_unique():
    world = build_world(0, 400)
    names = [p.name for p in world.people] + [c.name for c in world.companies] + [c.name for c in world.cities]
    assert len(names) == len(set(names))
