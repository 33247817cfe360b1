"""The paper's comparison in miniature: ``python -m launch.experiment [group=option ...] [key=value ...]``.

    python -m launch.experiment                                  # conf/comparison.yaml: every arm, this machine
    python -m launch.experiment data.synthetic_seed=7 data.dir=data/world7 comparison.dir=runs/experiment7
    python -m launch.experiment "comparison.arms=[warmup,rl_bm25]" train.total_steps=10

It takes the training config (``conf/comparison.yaml`` is ``conf/config.yaml`` at the experiment's scale), so
``data.*``, ``train.*`` and ``learner.*`` mean what they mean for training. The arms:

    base            the shipped instruct model (direct, rag, agent)
    warmup          the warm-up policy alone (direct, rag, agent): the start of every RL arm
    rl_bm25         RL from the warm-up policy against real BM25 (Search-R1's setting)
    rl_sim_prompt   RL against the simulator in prompt mode (the shipped SmolLM2)
    rl_sim_tuned    RL against a tuned simulator (``make simulator``'s output, or ``comparison.tuned_simulator``)

Every RL arm gets the same steps, seeds, prompts and budget, and starts from the same warm-up policy, which is also
its KL reference. Every policy is evaluated the same way: agent method, real BM25 over the world's corpus, the test
split, greedy. Each arm writes ``<dir>/<arm>/arm.json`` when it is done; a rerun skips those and resumes an
interrupted RL arm from its last checkpoint. ``results.md``, ``results.json``, ``reward.png`` and ``heldout.png`` are
written anew after every arm.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from launch.config import Config, register_configs
from launch.driver.checkpoint import atomic_write_json

register_configs()

ARMS = ("base", "warmup", "rl_bm25", "rl_sim_prompt", "rl_sim_tuned")
RL_ARMS = {  # each RL arm's search engine, as training overrides
    "rl_bm25": ["search=bm25"],
    "rl_sim_prompt": ["search=simulated"],
    "rl_sim_tuned": ["search=simulated", "simulator.mode=sft"],
}
ARM_FILE = "arm.json"
ROW_FIELDS = ("arm", "method", "subem", "em", "f1", "searches_per_question", "subem_single_hop", "subem_two_hop",
              "train_wall_s", "run_dir")
# Keys an arm sets itself; the same key given on the command line is dropped from the arm's overrides.
_ARM_KEYS = ("search", "simulator.mode", "simulator.model", "model.name", "train.warmup", "logger.run_dir",
             "logger.run_name", "resume")


@hydra.main(version_base="1.3", config_path="../conf", config_name="comparison")
def main(dict_cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task)
    run_experiment(dict_cfg, overrides)


def run_experiment(dict_cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Run every arm that is not done yet, then write the table and the curves; return the results."""
    cfg: Config = OmegaConf.to_object(dict_cfg)
    c = cfg.comparison
    unknown = [a for a in c.arms if a not in ARMS]
    if unknown:
        raise ValueError(f"comparison.arms has {unknown}; expected any of {list(ARMS)}")
    out = Path(c.dir)
    out.mkdir(parents=True, exist_ok=True)
    from launch.paths import ensure_data

    files = ensure_data(cfg.data)
    base_model, warmed, warmup_s = _warmed_policy(cfg, files, out)
    arms: dict[str, dict[str, Any]] = {}
    for arm in c.arms:
        folder = out / arm
        if (folder / ARM_FILE).is_file():
            arms[arm] = json.loads((folder / ARM_FILE).read_text())
            print(f"experiment: {arm} is done ({folder / ARM_FILE}); skipped", flush=True)
        else:
            result = _run_arm(arm, cfg, overrides, base_model, warmed, files, folder)
            if result is None:
                continue
            atomic_write_json(folder / ARM_FILE, result)
            arms[arm] = result
            _write_results(out, cfg, arms, warmup_s)  # an interrupted experiment still leaves its table
    return _write_results(out, cfg, arms, warmup_s)


def _warmed_policy(cfg: Config, files: dict[str, Path], out: Path) -> tuple[str, str, float]:
    """The shipped model, the warm-up policy every RL arm starts from (built once; cached), and the seconds the
    warm-up took when it was built."""
    import ray

    from launch.assets import resolve_model
    from launch.driver.cluster import init_ray
    from launch.driver.warmup import warm_up

    base = resolve_model(cfg.model.name)
    init_ray(cfg)
    try:
        warmed, summary = warm_up(cfg, base, files["train"], files["corpus"], out / "warmup_policy")
    finally:
        ray.shutdown()
    if summary:
        atomic_write_json(out / "warmup.json", {k: v for k, v in summary.items() if k != "example"})
    return base, warmed, summary.get("seconds", 0.0)


def _run_arm(arm: str, cfg: Config, overrides: list[str], base_model: str, warmed: str, files: dict[str, Path],
             folder: Path) -> dict[str, Any] | None:
    if arm in ("base", "warmup"):
        policy = base_model if arm == "base" else warmed
        rows = evaluate_policy(cfg, policy, files, folder / "eval", cfg.comparison.baseline_methods)
        return {"arm": arm, "policy": policy, "train_wall_s": 0.0, "run_dir": "", "rows": rows}
    arm_overrides = list(RL_ARMS[arm])
    if arm == "rl_sim_tuned":
        tuned = Path(cfg.comparison.tuned_simulator or Path(cfg.simulation.dir) / "tuned" / "hf")
        if not (tuned / "config.json").is_file():
            print(f"experiment: {arm} skipped: no tuned simulator at {tuned} (run `make simulator`, or set "
                  f"comparison.tuned_simulator)", flush=True)
            return None
        arm_overrides.append(f"simulator.model={tuned.resolve()}")
    run_dir = folder / "run"
    summary, train_s = train_arm(overrides, arm_overrides, warmed, run_dir, arm)
    rows = evaluate_policy(cfg, str(run_dir), files, folder / "eval", ["agent"])
    return {"arm": arm, "policy": summary["checkpoint"], "train_wall_s": train_s, "run_dir": str(run_dir),
            "rows": rows}


def train_arm(overrides: list[str], arm_overrides: list[str], policy: str, run_dir: Path,
              arm: str) -> tuple[dict[str, Any], float]:
    """One RL run from ``policy`` (the warm-up policy, also the KL reference), in ``run_dir``; resumes when the folder
    holds a checkpoint. Its wall time is summed over sessions, so a resumed arm reports its whole cost."""
    from hydra import compose

    from launch.train import train

    kept = [o for o in overrides if _override_key(o) not in _ARM_KEYS]
    composed = compose(config_name="comparison", overrides=kept + arm_overrides + [
        f"model.name={policy}", "train.warmup=off", f"logger.run_dir={run_dir.resolve()}", f"logger.run_name={arm}",
        "resume=auto"])
    run_dir.mkdir(parents=True, exist_ok=True)
    spent_file = run_dir / "wall_s.json"
    spent = json.loads(spent_file.read_text())["seconds"] if spent_file.is_file() else 0.0
    started = time.perf_counter()
    try:
        summary = train(OmegaConf.to_object(composed), run_dir, OmegaConf.to_container(composed, resolve=True))
    finally:  # a session that dies still counts; the resumed one adds its own
        spent += time.perf_counter() - started
        atomic_write_json(spent_file, {"seconds": spent})
    return summary, spent


def _override_key(override: str) -> str:
    key = override.split("=", 1)[0].lstrip("+~")
    return key


def evaluate_policy(cfg: Config, policy: str, files: dict[str, Path], out: Path, methods: list[str]) -> list[dict]:
    """``launch.evaluate`` of one policy on the world's test split, real BM25, greedy, with training's episode limits;
    one row per method, with SubEM on single-hop and two-hop questions apart."""
    from actors.dataset import load_qa
    from launch.command_config import EvalConfig
    from launch.evaluate import evaluate

    eval_cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, name=policy),
        data=dataclasses.replace(cfg.data, dir=str(files["test"].parent)),
        search=dataclasses.replace(cfg.search, engine="bm25", corpus_file=str(files["corpus"])),
        logger=dataclasses.replace(cfg.logger, run_dir=str(out),
                                   wandb=dataclasses.replace(cfg.logger.wandb, mode="disabled")),
        cluster=dataclasses.replace(cfg.cluster, rollout_cpu_threads=0),  # nothing trains beside the evaluation
        eval=EvalConfig(benchmarks=["synthetic"], methods=list(methods), limit=cfg.comparison.eval_limit or 10**9))
    evaluate(eval_cfg)
    hops = {e.uid: e.data_source for e in load_qa(files["test"])}
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines() if line.strip()]
    return [method_row(method, [r for r in records if r["method"] == method], hops) for method in methods]


def method_row(method: str, records: list[dict], source_of: dict[str, str]) -> dict[str, float | str]:
    """The table's numbers for one method's records (percent), overall and by hop count."""
    from actors.evaluation import EvalRecord

    def mean(values: list[float]) -> float:
        return 100.0 * sum(values) / len(values) if values else float("nan")

    scores = [(EvalRecord(**{k: v for k, v in r.items() if k != "method"}).scores(), r) for r in records]
    by_hops = {n: [s["subem"] for s, r in scores if source_of.get(r["uid"]) == f"synthetic_{n}hop"] for n in (1, 2)}
    return {"method": method, "n": len(records),
            "subem": mean([s["subem"] for s, _ in scores]), "em": mean([s["em"] for s, _ in scores]),
            "f1": mean([s["f1"] for s, _ in scores]),
            "searches_per_question": sum(r["searches"] for r in records) / max(len(records), 1),
            "subem_single_hop": mean(by_hops[1]), "subem_two_hop": mean(by_hops[2])}


def table_rows(arms: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per arm and method, in the arms' order, with the fields of ``ROW_FIELDS``."""
    rows = []
    for arm in ARMS:
        if arm not in arms:
            continue
        for row in arms[arm]["rows"]:
            rows.append({"arm": arm, **row, "train_wall_s": arms[arm]["train_wall_s"], "run_dir": arms[arm]["run_dir"]})
    return rows


def _write_results(out: Path, cfg: Config, arms: dict[str, dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    rows = table_rows(arms)
    t = cfg.train
    setting = {"world_seed": cfg.data.synthetic_seed, "data_dir": cfg.data.dir, "seed": cfg.seed,
               "algorithm": t.algorithm, "total_steps": t.total_steps, "prompts_per_step": t.prompts_per_step,
               "group_size": t.group_size, "lr": cfg.learner.lr, "top_k": cfg.search.top_k,
               "max_turns": cfg.rollout.episode.max_turns, "warmup_s": warmup_s}
    results = {"setting": setting, "rows": rows}
    atomic_write_json(out / "results.json", results)
    # An RL arm's run is always `<dir>/<arm>/run`; its recorded path may be relative to another working directory.
    curves = plot_curves(out, {arm: out / arm / "run" for arm, a in arms.items() if a["run_dir"]})
    lines = [f"Policy `{cfg.model.name}`; world seed {setting['world_seed']}; every RL arm {t.algorithm}, "
             f"{t.total_steps} steps of {t.prompts_per_step} questions x {t.group_size}, lr {cfg.learner.lr:g}. "
             f"Evaluation: agent (and the baselines' direct and rag), real BM25 top {cfg.search.top_k}, the test "
             f"split, greedy.", "",
             "| arm | method | SubEM | EM | F1 | searches | SubEM 1-hop | SubEM 2-hop | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['method']} | {r['subem']:.1f} | {r['em']:.1f} | {r['f1']:.1f} | "
                     f"{r['searches_per_question']:.2f} | {r['subem_single_hop']:.1f} | {r['subem_two_hop']:.1f} | "
                     f"{r['train_wall_s']:.0f} |")
    lines += ["", *[f"![{name}]({path.name})" for name, path in curves.items()]]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return results


def plot_curves(out: Path, runs: dict[str, Path]) -> dict[str, Path]:
    """``reward.png``: the training reward per step of every RL arm (and by hop count); ``heldout.png``: held-out
    SubEM during training (``train.val_every``), under the arm's own engine and under BM25."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = {arm: _read_jsonl(run / "metrics.jsonl") for arm, run in runs.items()}
    metrics = {arm: rows for arm, rows in metrics.items() if rows}
    if not metrics:
        return {}
    panels = {"reward.png": ["critic/score/mean", "critic/score/synthetic_2hop", "search/calls_per_episode"],
              "heldout.png": ["val/simulated/subem", "val/bm25/subem"]}
    written = {}
    for name, keys in panels.items():
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for arm, rows in metrics.items():
                points = [(r["step"], r[key]) for r in rows if key in r]
                if points:
                    ax.plot(*zip(*points), marker="o", markersize=3, label=arm)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step")
            if ax.lines:
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written[name.removesuffix(".png")] = out / name
    return written


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    main()
