"""Hydra configuration: it composes, prints, and rejects misspelled keys before anything starts."""

from __future__ import annotations

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
