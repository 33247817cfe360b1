"""Run outputs: ``metrics.jsonl`` (one line per step, appended and flushed), W&B (offline by default) with a table of
sample trajectories, and a PNG of the main curves at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PLOT_KEYS = ("critic/score/mean", "search/noise_prob", "search/calls_per_episode", "response_length/mean",
             "actor/kl")


class RunLogger:
    def __init__(self, run_dir: Path, wandb_cfg: Any, run_name: str, config: dict[str, Any], resume: bool) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.wandb = None
        if wandb_cfg.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, group=wandb_cfg.group,
                                    tags=list(wandb_cfg.tags), name=run_name or None, mode=wandb_cfg.mode,
                                    dir=str(self.run_dir), config=config, resume="allow" if resume else None,
                                    id=_stable_id(self.run_dir) if resume else None)

    def log(self, step: int, metrics: dict[str, float], samples: list[dict[str, Any]] | None = None) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.wandb is not None:
            payload: dict[str, Any] = dict(metrics)
            if samples:
                import wandb

                columns = list(samples[0])
                payload["samples"] = wandb.Table(columns=columns, data=[[s[c] for c in columns] for s in samples])
            self.wandb.log(payload, step=step)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def plot(self) -> Path | None:
        rows = self.read_metrics()
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(PLOT_KEYS), figsize=(4 * len(PLOT_KEYS), 3.2))
        for ax, key in zip(axes, PLOT_KEYS):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step")
        fig.tight_layout()
        path = self.run_dir / "curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def finish(self) -> str | None:
        if self.wandb is None:
            return None
        location = self.wandb.dir
        self.wandb.finish()
        return location


def _stable_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
