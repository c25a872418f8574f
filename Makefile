# Two commands from a fresh clone: `make demo` and `make test`. Each installs into .venv itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.featcache-installed
PYTEST_ARGS ?=
# The exact torch/torchvision this offline machine has (pyproject.toml holds only the supported ranges).
PIP_CONSTRAINTS ?= constraints/offline-machine.txt

.PHONY: demo test test-fast lint bench bench-full install clean

$(STAMP): pyproject.toml $(PIP_CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(if $(PIP_CONSTRAINTS),-c $(PIP_CONSTRAINTS)) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/featcache demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.run --preset quick

bench-full: $(STAMP)
	$(PY) -m benchmarks.run --preset full

clean:
	rm -rf $(VENV) demo-out build *.egg-info
