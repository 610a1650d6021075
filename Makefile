# Two entry points for a fresh machine, both idempotent:
#   make demo   installs fastntk in .venv and runs `fastntk compute` on its built-in default
#   make test   installs fastntk with its test extras in .venv and runs the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install install-test demo test bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(PIP) -e .

install-test: $(BIN)/python
	$(PIP) -e '.[test]'

demo: install
	$(BIN)/fastntk compute

test: install-test
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/run.py
