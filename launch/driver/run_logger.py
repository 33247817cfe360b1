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
        self.batches_path = self.run_dir / "batches.jsonl"
        self.wandb = None
        if wandb_cfg.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, group=wandb_cfg.group,
                                    tags=list(wandb_cfg.tags), name=run_name or None, mode=wandb_cfg.mode,
                                    dir=str(self.run_dir), config=config, resume="allow" if resume else None,
                                    id=_stable_id(self.run_dir) if resume else None)

    def log(self, step: int, metrics: dict[str, float], samples: list[dict[str, Any]] | None = None,
            batch: dict[str, Any] | None = None) -> None:
        """One step: its metrics row, and in ``batches.jsonl`` what it trained on (prompt ids, policy versions)."""
        _append_line(self.metrics_path, {"step": step, **metrics})
        if batch is not None:
            _append_line(self.batches_path, {"step": step, **batch})
        if self.wandb is not None:
            payload: dict[str, Any] = dict(metrics)
            if samples:
                import wandb

                columns = list(samples[0])
                payload["samples"] = wandb.Table(columns=columns, data=[[s[c] for c in columns] for s in samples])
            self.wandb.log(payload, step=step)

    def truncate_after(self, step: int) -> int:
        """Drop the rows of steps after ``step`` (logged after the checkpoint a resumed run starts from), so that the
        resumed run's rows continue the files without a repeat. Atomic: a crash leaves the old file or the new one.
        Returns the number of metrics rows dropped."""
        dropped = 0
        for path in (self.metrics_path, self.batches_path):
            rows = _read_lines(path)
            kept = [r for r in rows if r["step"] <= step]
            if len(kept) != len(rows):
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
                os.replace(tmp, path)
            if path == self.metrics_path:
                dropped = len(rows) - len(kept)
        return dropped

    def read_metrics(self) -> list[dict[str, Any]]:
        return _read_lines(self.metrics_path)

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


def _append_line(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stable_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
