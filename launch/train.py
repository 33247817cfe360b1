"""The training driver: ``python -m launch.train [group=option ...] [key=value ...]``.

    python -m launch.train --cfg job            # print the composed config and exit
    python -m launch.train model=tiny_llama     # the default job on the tiny test model
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from launch.config import register_configs
from launch.paths import ensure_data

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    files = ensure_data(cfg.data)
    for name, path in files.items():
        print(f"data.{name}\t{path}")
    print("The RL training loop is not built yet (see the open issue 'The RL loop turns').", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
