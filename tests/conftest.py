"""Shared fixtures: the shipped model assets and a small synthetic world, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Tests never talk to W&B servers or model hubs.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def tiny_llama_path() -> Path:
    from launch.assets import TINY_LLAMA, ensure

    return ensure(TINY_LLAMA)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from launch.assets import SMOLLM2, ensure

    return ensure(SMOLLM2)


@pytest.fixture(scope="session")
def tokenizer(tiny_llama_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_path)


@pytest.fixture(scope="session")
def synthetic_world(tmp_path_factory) -> dict[str, Path]:
    from launch.synthetic_world import write_world

    return write_world(tmp_path_factory.mktemp("world"), seed=3, entities=64)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the tests that need one; stopped at the end of the session."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()
