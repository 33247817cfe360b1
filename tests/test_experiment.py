"""``launch.experiment``: the table's numbers by hand, and a smoke run of the whole comparison on tiny-llama."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def _record(uid: str, prediction: str | None, answer: str, searches: int = 1, method: str = "agent") -> dict:
    return {"method": method, "dataset": "synthetic", "uid": uid, "question": "q", "golden_answers": [answer],
            "prediction": prediction, "searches": searches, "generated_tokens": 5, "turns": 2, "invalid_actions": 0,
            "response": ""}


def test_method_row_scores_overall_and_by_hop_count():
    from launch.experiment import method_row

    source_of = {"a": "synthetic_1hop", "b": "synthetic_1hop", "c": "synthetic_2hop", "d": "synthetic_2hop"}
    records = [_record("a", "Velmor City", "Velmor"),       # SubEM 1 (the gold answer is inside), EM 0
               _record("b", "Velmor", "Velmor"),            # EM 1
               _record("c", None, "Karth", searches=2),     # no answer: 0
               _record("d", "Drune", "Karth", searches=2)]  # wrong: 0
    row = method_row("agent", records, source_of)
    assert row["subem"] == pytest.approx(50.0) and row["em"] == pytest.approx(25.0)
    assert row["subem_single_hop"] == pytest.approx(100.0) and row["subem_two_hop"] == pytest.approx(0.0)
    assert row["searches_per_question"] == pytest.approx(1.5) and row["n"] == 4
    # F1: "velmor city" vs "velmor" is 2/3; exact 1; the rest 0
    assert row["f1"] == pytest.approx(100.0 * (2 / 3 + 1) / 4)


def test_table_rows_follow_the_arms_order_and_carry_each_arms_run():
    from launch.experiment import ROW_FIELDS, table_rows

    row = {"method": "agent", "n": 1, "subem": 1.0, "em": 1.0, "f1": 1.0, "searches_per_question": 1.0,
           "subem_single_hop": 1.0, "subem_two_hop": 0.0}
    arms = {"rl_bm25": {"rows": [row], "train_wall_s": 12.0, "run_dir": "x/run"},
            "base": {"rows": [{**row, "method": "direct"}, row], "train_wall_s": 0.0, "run_dir": ""}}
    rows = table_rows(arms)
    assert [(r["arm"], r["method"]) for r in rows] == [("base", "direct"), ("base", "agent"), ("rl_bm25", "agent")]
    assert rows[2]["train_wall_s"] == 12.0 and rows[2]["run_dir"] == "x/run"
    assert all(set(ROW_FIELDS) <= set(r) for r in rows)


def test_the_curves_read_each_arms_run_in_the_experiment_folder_wherever_it_was_recorded_from(tmp_path):
    from launch.config import Config
    from launch.experiment import _write_results

    run = tmp_path / "rl_bm25" / "run"
    run.mkdir(parents=True)
    run.joinpath("metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "critic/score/mean": 0.1 * s, "val/bm25/subem": 10.0 * s}) + "\n" for s in (1, 2)))
    row = {"method": "agent", "n": 1, "subem": 1.0, "em": 1.0, "f1": 1.0, "searches_per_question": 1.0,
           "subem_single_hop": 1.0, "subem_two_hop": 0.0}
    # The arm was run from another working directory: its recorded path does not resolve from here.
    arms = {"rl_bm25": {"rows": [row], "train_wall_s": 5.0, "run_dir": "elsewhere/rl_bm25/run"}}
    _write_results(tmp_path, Config(), arms, 0.0)
    assert (tmp_path / "reward.png").stat().st_size > 0 and (tmp_path / "heldout.png").stat().st_size > 0


def test_an_arm_sets_its_own_engine_and_start_whatever_the_command_line_says():
    from launch.experiment import _ARM_KEYS, _override_key

    given = ["search=simulated", "train.total_steps=3", "+resume=off", "model.name=x", "learner.lr=1e-5"]
    assert [o for o in given if _override_key(o) not in _ARM_KEYS] == ["train.total_steps=3", "learner.lr=1e-5"]


def test_unknown_arm_is_refused_with_the_known_ones(tmp_path):
    cmd = [sys.executable, "-m", "launch.experiment", "comparison.arms=[rl_bm26]", f"comparison.dir={tmp_path}",
           f"hydra.run.dir={tmp_path / 'hydra'}"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "rl_bm26" in result.stderr and "rl_sim_prompt" in result.stderr


# The whole comparison at the smallest size: the warm-up policy's evaluation, and one RL arm of one step against a
# "tuned" simulator played by tiny-llama itself (the simulator pool, the sft path, and validation under BM25 all run),
# then its evaluation on 4 questions. The other RL arms differ only in the search group, which the training e2e tests
# run; one arm keeps this smoke test at about a minute and a half.
SMOKE = ["model=tiny_llama", "learner=tiny", "simulator=tiny", "train.total_steps=1", "train.prompts_per_step=2",
         "train.group_size=2", "train.val_every=1", "train.val_samples=2", "rollout.episode.max_tokens_per_turn=64",
         "rollout.episode.max_obs_tokens=96", "data.synthetic_entities=32", "logger.wandb.mode=offline",
         "warmup.demonstrations=8", "warmup.steps=1", "warmup.batch_size=4", "warmup.lr=1e-3", "warmup.cache=false",
         "comparison.eval_limit=4", "comparison.baseline_methods=[rag,agent]",
         "comparison.arms=[warmup,rl_sim_tuned]"]


@pytest.mark.slow
def test_the_experiment_runs_every_arm_writes_the_table_and_skips_done_arms(tmp_path, tiny_llama_path):
    out = tmp_path / "experiment"
    cmd = [sys.executable, "-m", "launch.experiment", *SMOKE, f"data.dir={tmp_path / 'world'}",
           f"comparison.dir={out}", f"comparison.tuned_simulator={tiny_llama_path}",
           f"hydra.run.dir={tmp_path / 'hydra'}"]
    first = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]

    results = json.loads((out / "results.json").read_text())
    arms = [(r["arm"], r["method"]) for r in results["rows"]]
    assert arms == [("warmup", "rag"), ("warmup", "agent"), ("rl_sim_tuned", "agent")]
    for row in results["rows"]:
        assert row["n"] == 4 and 0.0 <= row["subem"] <= 100.0
        assert (row["train_wall_s"] > 0) == row["arm"].startswith("rl_")
    for arm in ("rl_sim_tuned",):
        steps = [json.loads(line) for line in (out / arm / "run" / "metrics.jsonl").read_text().splitlines()]
        assert len(steps) == 1 and "val/bm25/subem" in steps[0] and "val/simulated/subem" in steps[0]
        # The comparison skips the update of a step none of whose groups has a signal (tiny-llama's usually).
        skipped = steps[0]["data/signal_share"] == 0.0
        assert steps[0]["train/update_skipped"] == float(skipped) and ("actor/pg_loss" in steps[0]) != skipped
        assert (out / arm / "run" / "wandb").is_dir()
    # The RL arm starts from the warm-up policy that was evaluated (warmup.cache=false: it lives in the experiment's
    # folder), and the table names the simulator it trained against.
    summary = json.loads((out / "rl_sim_tuned" / "run" / "summary.json").read_text())
    assert summary["policy_start"] == str(out / "warmup_policy" / "warmed_policy")
    run_config = json.loads((out / "rl_sim_tuned" / "arm.json").read_text())
    assert run_config["policy"].startswith(str(out / "rl_sim_tuned" / "run" / "checkpoints"))
    assert "| rl_sim_tuned | agent |" in (out / "results.md").read_text()
    assert (out / "reward.png").stat().st_size > 0 and (out / "heldout.png").stat().st_size > 0

    again = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    assert again.stdout.count("is done") == 2 and "step 1/1" not in again.stdout
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]
