"""Step time of on-policy training against one step of staleness, on the default experiment, measured in one run.

    python bench/async_overlap.py [--steps 5] [--skip 1] [overrides ...]

Runs ``python -m launch.train`` (the ``make train`` job, plus any Hydra overrides) twice, with
``train.max_staleness=0`` and ``=1``, and reads each run's ``metrics.jsonl``. Steps before ``--skip`` are left out
(the first step has nothing to overlap with and pays for warm caches). For each run it reports the mean step time,
rollout time, training time, and ``step / max(rollout, train)``: about 1 + faster/slower when the two alternate
(on-policy), and 1 when they overlap perfectly. On a machine where rollout and training share the same cores, overlap
can only hide the time one of them leaves the cores idle. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(staleness: int, steps: int, overrides: list[str], folder: Path) -> list[dict]:
    run_dir = folder / f"staleness_{staleness}"
    cmd = [sys.executable, "-m", "launch.train", f"train.max_staleness={staleness}", f"train.total_steps={steps}",
           "train.throughput_probe=false", "train.export_hf=false", "logger.wandb.mode=disabled",
           f"hydra.run.dir={run_dir}", *overrides]
    subprocess.run(cmd, cwd=REPO, check=True, timeout=3600, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summarise(rows: list[dict], skip: int) -> dict:
    rows = rows[skip:]

    def mean(key: str) -> float:
        return round(statistics.fmean(r[key] for r in rows), 2)

    return {"steps_measured": len(rows), "step_s": mean("timing_s/step"), "rollout_s": mean("timing_s/gen"),
            "train_s": mean("timing_s/train"), "sync_s": mean("timing_s/sync"),
            "step_over_slower": round(statistics.fmean(r["timing_s/step"] / max(r["timing_s/gen"], r["timing_s/train"])
                                                       for r in rows), 2),
            "staleness_mean": mean("async/staleness_mean"), "reward_mean": mean("critic/score/mean")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--skip", type=int, default=1)
    args, overrides = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = {f"max_staleness_{k}": summarise(run(k, args.steps, overrides, Path(tmp)), args.skip)
                  for k in (0, 1)}
    on_policy, one_behind = result["max_staleness_0"], result["max_staleness_1"]
    result["step_time_ratio_1_over_0"] = round(one_behind["step_s"] / on_policy["step_s"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
