"""The soak: a long run under repeated faults completes every step and loses no episode, in one run.

    python bench/soak.py [--steps 30] [key=value ...]

Trains tiny-llama against the simulator pool with ``faults=soak``: simulator server 0 killed every 5 steps, the
rollout engine killed at step 17 with a group in flight, one simulator reply in ten garbled. Every kill is a real
``ray.kill``. Reads the run's ``metrics.jsonl`` and prints one JSON object: ``ratio`` is the share of the steps that
completed with every group whole (``goal`` 1.0), beside the kills, restarts, reruns and garbled replies the metrics
recorded, and the lost and duplicated episodes (both must be 0). ``tests/test_faults_e2e.py`` runs the same soak with
two simulator servers and asserts it; this script measures it with one, where a kill step waits for the restart.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = ["model=tiny_llama", "learner=tiny", "simulator=tiny", "train.prompts_per_step=2", "train.group_size=2",
        "train.warmup=off", "rollout.episode.max_tokens_per_turn=24", "rollout.episode.max_obs_tokens=96",
        "rollout.guided_first_turn_regex='<search> [a-z]{2,8} [a-z]{2,8} </search>'", "data.synthetic_entities=32",
        "logger.wandb.mode=disabled", "train.export_hf=false", "train.throughput_probe=false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--timeout-s", type=float, default=3600.0)
    parser.add_argument("overrides", nargs="*", help="training config overrides, key=value")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="soak-"))
    cmd = [sys.executable, "-m", "launch.train", *TINY, "faults=soak", f"train.total_steps={args.steps}",
           *args.overrides, f"data.dir={folder / 'world'}", f"hydra.run.dir={folder / 'run'}"]
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout_s)
    seconds = time.perf_counter() - started
    metrics = folder / "run" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    whole = [r for r in rows if r.get("faults/lost_episodes") == 0.0 and r.get("faults/duplicate_episodes") == 0.0]
    last = rows[-1] if rows else {}
    print(json.dumps({
        "bench": "soak", "ratio": round(len(whole) / args.steps, 3), "goal": 1.0, "exit_code": result.returncode,
        "steps_asked": args.steps, "steps_done": len(rows), "steps_whole": len(whole), "seconds": round(seconds, 1),
        **{k.split("/", 1)[1]: last.get(k) for k in (
            "faults/simulator_kills", "faults/simulator_restarts", "faults/rollout_kills", "faults/rollout_restarts",
            "faults/rerun_groups", "faults/garbled_replies", "simulator/failures")},
        "lost_episodes": sum(r.get("faults/lost_episodes", 0.0) for r in rows),
        "duplicate_episodes": sum(r.get("faults/duplicate_episodes", 0.0) for r in rows),
        "max_step_s": round(max((r["timing_s/step"] for r in rows), default=0.0), 1),
        "run_dir": str(folder / "run"), "stderr_tail": result.stderr[-1500:] if result.returncode else "",
    }, indent=1))


if __name__ == "__main__":
    main()
