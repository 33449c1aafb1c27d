# Two commands on a fresh machine:
#   make bench     set up .venv and run the main job (python -m attnbench; ARGS="..." to override)
#   make test      set up .venv and run the test suite's quick tier (what CI runs;
#                  make test-full runs all of it). PYTEST_ARGS narrows either to what it
#                  names, without the notebook: make test PYTEST_ARGS="tests/test_pattern.py -k x"
# TORCH pins the torch build: torch==2.13.0 is the CPU build where one is on disk;
# on a CUDA machine use the torch you have (make TORCH=torch) or install it first.
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=
# what pytest runs: the whole suite and the notebook, or (PYTEST_ARGS given) that alone;
# pytest's testpaths supply tests/ when PYTEST_ARGS holds options only
TESTS = $(if $(strip $(PYTEST_ARGS)),$(PYTEST_ARGS),tests)
NOTEBOOKS = $(if $(strip $(PYTEST_ARGS)),,$(VENV)/bin/python -m pytest -q --nbmake notebooks)

.PHONY: setup bench test test-full lint mutation scaling benchmark clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

bench: setup
	$(VENV)/bin/python -m attnbench $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest -q -n 3 -m "not full" $(TESTS)
	$(NOTEBOOKS)

test-full: setup
	$(VENV)/bin/python -m pytest -q -n auto --maxprocesses 4 $(TESTS)
	$(NOTEBOOKS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

mutation: setup
	$(VENV)/bin/python scripts/mutation_check.py

scaling: setup
	$(VENV)/bin/python -m attnbench experiment=scaling $(ARGS)

benchmark: setup
	$(VENV)/bin/python -m pytest benchmarks --benchmark-only --benchmark-autosave $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .benchmarks
