# Two commands for a fresh clone (see README):
#   make demo   set everything up, build, and run the main job: fastpt demo (<= 10 min, 2 cores)
#   make test   set everything up, build, and run the test suite
# Everything goes into .venv; nothing is installed system-wide.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch, from the configured pip index (on this project's machines a local CPU wheel). On
# PyPI's Linux index this version is a multi-GB CUDA build: there, pass the CPU wheel's index,
# e.g. make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup install test demo bench check-cuda clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first (only where the venv has none), then the build backend, since the build runs
# with --no-build-isolation against this very torch.
$(VENV)/.setup-done: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q "scikit-build-core>=0.10"
	touch $@

setup: $(VENV)/.setup-done

# Incremental: the CMake build folder (build/) is kept between installs. flock keeps two
# concurrent installs from sharing that folder.
install: setup
	@mkdir -p build
	flock build/.install.lock $(BIN)/pip install -q --no-build-isolation ".[test]"

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

demo: install
	$(BIN)/fastpt demo $(DEMO_ARGS)

bench: install
	$(BIN)/fastpt bench --json benchmarks/results.json --markdown benchmarks/results.md

check-cuda:
	bash .ci/check-cuda-kernels

clean:
	rm -rf build $(VENV)
