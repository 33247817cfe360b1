"""Where things are: the repository root, and the data files a config names (built on first use when synthetic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"


def resolve(path: str | Path) -> Path:
    """Relative paths in configs are taken from the repository root, so a run works from any folder."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def ensure_data(data_cfg: Any) -> dict[str, Path]:
    """The data files of ``data_cfg``; generates the synthetic world when it is configured and missing."""
    folder = resolve(data_cfg.dir)
    files = {
        "train": folder / data_cfg.train_file,
        "val": folder / data_cfg.val_file,
        "test": folder / data_cfg.test_file,
        "corpus": folder / data_cfg.corpus_file,
    }
    missing = [p for p in files.values() if not p.is_file()]
    if missing and data_cfg.generate_synthetic:
        from launch.synthetic_world import write_world

        write_world(folder, seed=data_cfg.synthetic_seed, entities=data_cfg.synthetic_entities)
        missing = [p for p in files.values() if not p.is_file()]
    if missing:
        names = ", ".join(str(p) for p in missing)
        raise FileNotFoundError(f"data files missing: {names}. Place them there, or set data.dir / data.*_file.")
    return files
