# Two commands from a fresh clone: `make demo` and `make test`. Each installs into .venv itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.featcache-installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast bench bench-full install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/featcache demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.run --preset quick

bench-full: $(STAMP)
	$(PY) -m benchmarks.run --preset full

clean:
	rm -rf $(VENV) demo-out build *.egg-info
