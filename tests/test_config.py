"""Hydra configuration: it composes, prints, and rejects misspelled keys before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from tests.conftest import REPO_ROOT


def _train(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.train", *overrides], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cfg_job_prints_the_composed_config():
    result = _train("--cfg", "job", "model=tiny_llama", "cluster.learners=2")
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["model"]["name"] == "tiny-llama"
    assert cfg["cluster"]["learners"] == 2
    assert cfg["curriculum"] == {**cfg["curriculum"], "name": "exp", "p_start": 0.0, "p_end": 0.5, "base": 4.0}


def test_misspelled_key_fails_naming_the_key():
    result = _train("--cfg", "job", "model.nmae=x")
    assert result.returncode != 0
    assert "nmae" in result.stderr and "ModelConfig" in result.stderr


def test_unknown_group_option_names_the_choices():
    result = _train("--cfg", "job", "curriculum=exponential")
    assert result.returncode != 0
    assert "exponential" in result.stderr and "exp" in result.stderr and "linear" in result.stderr


def test_wrong_type_is_rejected():
    result = _train("--cfg", "job", "cluster.learners=many")
    assert result.returncode != 0 and "cluster.learners" in result.stderr


def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from launch.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose(name, overrides=[*overrides, "logger.run_dir=unused"]))


def test_every_command_reads_the_training_groups_and_starts_its_engine_by_one_recipe():
    from launch.driver.cluster import policy_engine_options

    overrides = ["model=tiny_llama", "model.dtype=bfloat16", "search.top_k=3", "rollout.episode.max_turns=1",
                 "cluster.vllm_cpu_kvcache_gb=2", "seed=7"]
    train, evaluate, infer = (_compose(name, overrides) for name in ("config", "evaluate", "infer"))
    cores = len(os.sched_getaffinity(0))
    for cfg in (evaluate, infer):
        assert (cfg.model, cfg.rollout, cfg.simulator, cfg.seed) == \
               (train.model, train.rollout, train.simulator, train.seed)
        # The engines of evaluation and inference have the machine to themselves: its cores, not training's share
        # beside the simulator server.
        assert cfg.cluster == train.cluster
        assert cfg.search.top_k == 3 and cfg.search.engine == "bm25"  # evaluation and inference search a real engine
        kwargs, env = policy_engine_options(cfg)
        assert kwargs == policy_engine_options(train)[0] and env["OMP_NUM_THREADS"] == str(cores)
    assert train.search.engine == "simulated"
    kwargs, env = policy_engine_options(train)
    assert kwargs == {"dtype": "bfloat16", "max_model_len": 2048, "enforce_eager": True,
                      "gpu_memory_utilization": 0.3, "seed": 7, "tensor_parallel_size": 1,
                      "enable_prefix_caching": True, "block_size": 32}  # the CPU cluster's prefix-cache unit
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "2", "OMP_NUM_THREADS": str(max(1, cores // 2))}  # beside the simulator
    # Against BM25 the on-policy loop's engine generates alone; with rollouts ahead it shares with the learner.
    assert policy_engine_options(_compose("config", ["search=bm25"]))[1]["OMP_NUM_THREADS"] == str(cores)
    ahead = _compose("config", ["search=bm25", "train.max_staleness=1"])
    assert policy_engine_options(ahead)[1]["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    two = _compose("evaluate", ["cluster.rollout_engines=2"])
    assert policy_engine_options(two)[1]["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    assert policy_engine_options(_compose("config", ["cluster.rollout_gpus=1"]))[1] == {}  # a GPU engine
    assert "block_size" not in policy_engine_options(_compose("config", ["cluster.kv_block_size=null"]))[0]
    assert _compose("evaluate", ["search=simulated", "eval.limit=3"]).eval.limit == 3
