"""Exact resume: where a run's newest complete checkpoint is, the driver's random state, and atomic writes.

A checkpoint folder ``checkpoints/step_<k>`` is complete once its ``driver_state.json`` exists: it is written last,
atomically, after the DeepSpeed states. A crash in the middle of writing one leaves a folder without it, which is
skipped, so a resume always starts from a whole checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np

DRIVER_STATE = "driver_state.json"


def run_folder(resume: str, default: Path) -> Path:
    """The folder a run writes to: ``default`` unless ``resume`` names a run folder to continue in."""
    return default if resume in ("off", "auto") else Path(resume)


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """The newest complete ``step_<k>`` folder to resume from, or None to start fresh.

    ``resume=auto`` starts fresh when the run folder has no checkpoint yet (so the same command both starts and
    continues a run); a named folder without one is an error, since the user expected to continue something.
    """
    if resume == "off":
        return None
    root = Path(run_dir) / "checkpoints"
    steps = sorted((int(p.name.split("_", 1)[1]), p) for p in root.glob("step_*")
                   if p.name.split("_", 1)[1].isdigit() and (p / DRIVER_STATE).is_file())
    if steps:
        newest = steps[-1][1]
        try:
            json.loads((newest / DRIVER_STATE).read_text())
        except (OSError, ValueError) as e:  # written atomically, so this is damage from outside, not a crash
            raise ValueError(f"{newest / DRIVER_STATE} is not a readable driver state ({e}). The newest checkpoint is "
                             f"damaged; move {newest} aside to resume from the one before it") from e
        return newest
    if resume == "auto":
        return None
    raise FileNotFoundError(f"resume={resume!r}: no complete checkpoint (a step_<k> folder with {DRIVER_STATE}) "
                            f"under {root}")


def read_driver_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / DRIVER_STATE).read_text())


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's and torch's global generators, as JSON."""
    import torch  # here, not at the top: the entry points that fail on bad input stop before paying its import

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
