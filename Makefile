# Two entry points for a fresh machine, both idempotent:
#   make demo   installs fastntk in .venv and runs `fastntk compute` on its built-in default
#   make test   installs fastntk with its test extras in .venv and runs the test suite
#   make fuzz   the long run of the differential fuzzer (tests/fuzz): FUZZ_EXAMPLES per family
#   make docs   installs the docs extra in .venv and builds the documentation site (site/) with --strict
#   make examples  installs the examples extra and runs examples/widths.py and examples/digits.py
#                  (also one at a time: make widths, make digits; results in examples/out/)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install install-test demo test fuzz bench docs install-examples examples widths digits

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

FUZZ_EXAMPLES ?= 1000
fuzz: install-test
	FASTNTK_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FASTNTK_FUZZ_THRESHOLD_EXAMPLES=$(FUZZ_EXAMPLES) FASTNTK_FUZZ_COMBOS=$${FASTNTK_FUZZ_COMBOS:-12} \
		FASTNTK_FUZZ_SHRINK=1 HYPOTHESIS_PROFILE=dev \
		$(BIN)/python -m pytest -p no:cacheprovider tests/fuzz/test_fuzz.py tests/fuzz/test_fuzz_thresholds.py

bench: install
	$(BIN)/python bench/run.py

docs: $(BIN)/python
	$(PIP) -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

install-examples: $(BIN)/python
	$(PIP) -e '.[examples]'

widths: install-examples
	$(BIN)/python examples/widths.py

digits: install-examples
	$(BIN)/python examples/digits.py

examples: widths digits
