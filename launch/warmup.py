"""The policy warm-up alone: ``python -m launch.warmup [group=option ...] [key=value ...]`` (training's config).

It runs the cold start that ``launch.train`` runs first for small policies (``launch/driver/warmup.py``) and prints
the warmed-up policy's folder, from which ``launch.train model.name=FOLDER train.warmup=off`` trains.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from launch.config import Config, register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(dict_cfg: DictConfig) -> None:
    import ray

    from launch.assets import resolve_model
    from launch.driver.cluster import init_ray
    from launch.driver.warmup import warm_up
    from launch.paths import ensure_data

    cfg: Config = OmegaConf.to_object(dict_cfg)
    cfg.train.warmup = "on"  # asked for by name: run it whatever the model's size
    files = ensure_data(cfg.data)
    init_ray(cfg)
    try:
        path, _ = warm_up(cfg, resolve_model(cfg.model.name), files["train"], files["corpus"],
                          Path(dict_cfg.logger.run_dir))
    finally:
        ray.shutdown()
    print(f"warmed-up policy: {path}\ntrain from it with: python -m launch.train model.name={path} train.warmup=off")


if __name__ == "__main__":
    main()
