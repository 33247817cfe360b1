"""Bad input, table-driven: every entry point exits non-zero within seconds, with a message that names the file, row,
key or value and says what was expected, before any actor starts; and nothing written earlier changes.

Each case is one process run from the repository root. ``{world}`` is a copy of a small synthetic world, ``{bad}`` a
folder of broken data files written for the case, ``{tmp}`` the case's own folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO_ROOT

TRAIN = [sys.executable, "-m", "launch.train", "logger.wandb.mode=disabled", "train.warmup=off"]
EVALUATE = [sys.executable, "-m", "launch.evaluate", "logger.wandb.mode=disabled"]
INFER = [sys.executable, "-m", "launch.infer"]
PREPARE = [sys.executable, "-m", "launch.prepare_data"]
RETRIEVER = [sys.executable, "-m", "launch.serve_retriever"]
SIMULATOR = [sys.executable, "-m", "launch.serve_simulator"]
COLLECT = [sys.executable, "-m", "launch.collect_sim_data", "logger.wandb.mode=disabled"]
TUNE = [sys.executable, "-m", "launch.tune_simulator", "logger.wandb.mode=disabled"]
HYDRA_ENTRY_POINTS = ("launch.train", "launch.evaluate", "launch.infer", "launch.collect_sim_data",
                      "launch.tune_simulator")
WORLD = ["data.dir={world}", "data.generate_synthetic=false"]
BAD = ["data.dir={bad}", "data.generate_synthetic=false"]

# id: (command, what the message must contain (all of it), the broken data the case writes into {bad})
CASES: dict[str, tuple[list[str], list[str], str | None]] = {
    # Overrides
    "train-misspelled-key": (TRAIN + ["train.totl_steps=3"], ["totl_steps", "TrainConfig"], None),
    "train-wrong-type": (TRAIN + ["train.total_steps=many"], ["train.total_steps", "many"], None),
    "train-unknown-group-option": (TRAIN + ["curriculum=exponential"], ["exponential", "exp", "linear"], None),
    "train-unknown-algorithm": (TRAIN + WORLD + ["train.algorithm=ppg"], ["train.algorithm", "ppg", "grpo"], None),
    "train-group-size-1-grpo": (TRAIN + WORLD + ["train.group_size=1"], ["train.group_size=1", "grpo"], None),
    "train-skip-update-under-ppo": (TRAIN + WORLD + ["train.algorithm=ppo", "train.skip_update_without_signal=true"],
                                    ["train.skip_update_without_signal=true", "'ppo'", "grpo"], None),
    "train-group-size-0": (TRAIN + WORLD + ["train.group_size=0"], ["train.group_size=0"], None),
    "train-max-turns-negative": (TRAIN + WORLD + ["rollout.episode.max_turns=-1"],
                                 ["rollout.episode.max_turns=-1", "0 or more"], None),
    "train-p-end-above-1": (TRAIN + WORLD + ["curriculum.p_end=1.5"], ["p_end", "[0, 1]", "1.5"], None),
    "train-open-search-share-above-1": (TRAIN + WORLD + ["rollout.open_search_share=2"],
                                        ["rollout.open_search_share=2", "between 0 and 1"], None),
    "train-opened-tag-without-share": (TRAIN + WORLD + ["rollout.open_search_trains_tag=true"],
                                       ["rollout.open_search_trains_tag=true", "open_search_share=0"], None),
    "train-prompts-per-step-above-train-set": (TRAIN + WORLD + ["train.prompts_per_step=100000"],
                                               ["train.prompts_per_step=100000", "train.parquet"], None),
    "train-resume-missing-folder": (TRAIN + WORLD + ["resume={tmp}/no-such-run"], ["no-such-run", "resume"], None),
    "train-resume-half-written-checkpoint": (TRAIN + WORLD + ["resume={bad}/run"],
                                             ["no complete checkpoint", "driver_state.json", "run/checkpoints"],
                                             "half_written_checkpoint"),
    "train-resume-damaged-driver-state": (TRAIN + WORLD + ["resume={bad}/run"],
                                          ["step_4/driver_state.json", "not a readable driver state", "step_4"],
                                          "damaged_driver_state"),
    "train-weight-sync-unknown": (TRAIN + WORLD + ["cluster.weight_sync=ftp"], ["cluster.weight_sync", "ftp"], None),
    # Models
    "train-model-path-missing": (TRAIN + WORLD + ["model.name=/no/such/model"], ["no model at", "/no/such/model"],
                                 None),
    "train-model-folder-without-config": (TRAIN + WORLD + ["model.name={tmp}"], ["config.json"], None),
    "train-simulator-model-missing": (TRAIN + WORLD + ["simulator.model=/no/such/simulator"],
                                      ["no model at", "/no/such/simulator"], None),
    "train-simulator-placement-resource-nowhere": (TRAIN + WORLD + ["simulator.placement_resource=simulator_node"],
                                                   ["simulator.placement_resource='simulator_node'", "no live node",
                                                    "ray start --resources"], None),
    # Data files
    "train-corpus-corrupt-line": (TRAIN + BAD, ["corpus.jsonl:2", "JSON"], "corrupt_corpus_line"),
    "train-corpus-empty": (TRAIN + BAD, ["corpus.jsonl", "no documents"], "empty_corpus"),
    "train-corpus-without-contents": (TRAIN + BAD, ["corpus.jsonl:1", "contents"], "corpus_without_contents"),
    "train-parquet-missing-column": (TRAIN + BAD, ["train.parquet", "golden_answers"], "parquet_missing_column"),
    "train-parquet-empty-answers": (TRAIN + BAD, ["train.parquet", "row 0", "empty"], "parquet_empty_answers"),
    "train-parquet-non-string-question": (TRAIN + BAD, ["train.parquet", "row 0", "question"],
                                          "parquet_non_string_question"),
    "train-data-folder-missing": (TRAIN + ["data.dir={tmp}/nowhere", "data.generate_synthetic=false"],
                                  ["nowhere", "train.parquet"], None),
    # Evaluation and inference
    "evaluate-model-missing": (EVALUATE + WORLD + ["model.name=/no/such/model"], ["no model at", "/no/such/model"],
                               None),
    "evaluate-unknown-benchmark": (EVALUATE + WORLD + ["eval.benchmarks=[nosuchqa]"], ["nosuchqa"], None),
    "evaluate-unknown-method": (EVALUATE + WORLD + ["eval.methods=[oracle]"], ["eval.methods", "oracle", "agent"],
                                None),
    "evaluate-unknown-engine": (EVALUATE + WORLD + ["search.engine=altavista"], ["search.engine", "altavista", "bm25"],
                                None),
    "evaluate-serpapi-key-missing": (EVALUATE + WORLD + ["search=serpapi"], ["SERPAPI_API_KEY"], None),
    "evaluate-retriever-down": (EVALUATE + WORLD + ["search=http", "search.url=http://127.0.0.1:{dead_port}/retrieve"],
                                ["127.0.0.1:{dead_port}", "retriever"], None),
    "evaluate-no-benchmark-in-folder": (EVALUATE + ["data.dir={tmp}"], ["no benchmark found under {tmp}", "data.dir"],
                                        None),
    "infer-model-missing": (INFER + ["model.name=/no/such/model"], ["no model at", "/no/such/model"], None),
    "infer-simulated-engine": (INFER + ["search=simulated"], ["search.engine=simulated", "search=bm25"], None),
    # Data preparation
    "prepare-check-missing-column": (PREPARE + ["check", "{bad}/train.parquet"], ["train.parquet", "golden_answers"],
                                     "parquet_missing_column"),
    "prepare-check-missing-file": (PREPARE + ["check", "{tmp}/none.parquet"], ["none.parquet", "no such file"], None),
    # Servers
    "retriever-corpus-missing": (RETRIEVER + ["--corpus", "{tmp}/none.jsonl", "--port", "0"], ["none.jsonl"], None),
    "retriever-corpus-corrupt": (RETRIEVER + ["--corpus", "{bad}/corpus.jsonl", "--port", "0"],
                                 ["corpus.jsonl:2"], "corrupt_corpus_line"),
    "retriever-port-in-use": (RETRIEVER + ["--corpus", "{world}/corpus.jsonl", "--port", "{busy_port}"],
                              ["{busy_port}", "in use"], None),
    "simulator-model-missing": (SIMULATOR + ["--model", "/no/such/model", "--port", "0"],
                                ["no model at", "/no/such/model"], None),
    "simulator-port-in-use": (SIMULATOR + ["--model", "tiny-llama", "--port", "{busy_port}"],
                              ["{busy_port}", "in use"], None),
    # Simulation tuning
    "collect-misspelled-key": (COLLECT + ["simulation.nmae=x"], ["nmae"], None),
    "tune-without-collected-data": (TUNE + ["simulation.dir={tmp}/empty"], ["empty", "collect_sim_data"], None),
}


def _write_bad(kind: str, world: Path, bad: Path) -> None:
    """``bad`` is a copy of the world with one file broken."""
    shutil.copytree(world, bad)
    if kind in ("half_written_checkpoint", "damaged_driver_state"):  # a run folder to resume, under {bad}/run
        checkpoints = bad / "run" / "checkpoints"
        (checkpoints / "step_4" / "deepspeed").mkdir(parents=True)  # killed while writing: no driver_state.json
        if kind == "damaged_driver_state":
            (checkpoints / "step_2" / "deepspeed").mkdir(parents=True)
            (checkpoints / "step_2" / "driver_state.json").write_text('{"step": 2}')
            (checkpoints / "step_4" / "driver_state.json").write_text('{"step": 4, "curric')
        return
    corpus, train = bad / "corpus.jsonl", bad / "train.parquet"
    lines = corpus.read_text().splitlines()
    if kind == "corrupt_corpus_line":
        corpus.write_text("\n".join([lines[0], '{"id": "2", "contents": "unterminated', *lines[2:]]) + "\n")
    elif kind == "empty_corpus":
        corpus.write_text("")
    elif kind == "corpus_without_contents":
        corpus.write_text("\n".join([json.dumps({"id": "1", "body": "text"}), *lines[1:]]) + "\n")
    else:
        rows = pq.read_table(train).to_pylist()
        if kind == "parquet_missing_column":
            rows = [{k: v for k, v in r.items() if k not in ("golden_answers", "reward_model")} for r in rows]
        elif kind == "parquet_empty_answers":
            rows[0]["golden_answers"] = []
        elif kind == "parquet_non_string_question":
            table = pq.read_table(train)
            questions = pa.array([7] + [None] * (table.num_rows - 1), type=pa.int64())
            pq.write_table(table.set_column(table.schema.get_field_index("question"), "question", questions), train)
            return
        pq.write_table(pa.Table.from_pylist(rows), train)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(synthetic_world, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad-input") / "world"
    shutil.copytree(Path(synthetic_world["train"]).parent, folder)
    return folder


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_quickly_naming_what_is_wrong(case, world, tmp_path):
    command, expected, kind = CASES[case]
    bad = tmp_path / "bad"
    if kind:
        _write_bad(kind, world, bad)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    values = {"world": world, "bad": bad, "tmp": tmp_path, "dead_port": _free_port(),
              "busy_port": busy.getsockname()[1]}
    command = [part.format(**values) for part in command]
    expected = [text.format(**values) for text in expected]
    before = _digest(world), _digest(bad) if bad.is_dir() else {}
    if command[2] in HYDRA_ENTRY_POINTS:
        command.append(f"hydra.run.dir={tmp_path / 'hydra'}")
    env = {k: v for k, v in os.environ.items() if k != "SERPAPI_API_KEY"}
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env=env,
                                stdin=subprocess.DEVNULL)
    finally:
        busy.close()
    seconds = time.perf_counter() - started
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"{case} exited 0 after {seconds:.1f}s:\n{output[-3000:]}"
    missing = [text for text in expected if text not in output]
    assert not missing, f"{case}: the message lacks {missing}:\n{output[-3000:]}"
    assert "ray::" not in output and "ActorDiedError" not in output  # stopped before any actor started
    assert (_digest(world), _digest(bad) if bad.is_dir() else {}) == before  # nothing written earlier changed
