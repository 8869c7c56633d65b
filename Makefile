# Set-up and everyday commands. Everything runs inside .venv, with its bin/ first on PATH so DeepSpeed's
# JIT ops are always built by the same ninja (two ninjas on PATH make every run rebuild them).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN := PATH=$(abspath $(BIN)):$$PATH DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu}
EXTRAS ?= dev,logging,sweeps,datasets,gguf

.PHONY: install train test test-fast lint clean-pair

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

lint: install
	$(BIN)/python -m compileall -q tip tests
