# Two commands do all set-up on a fresh machine:
#   make run    create .venv, install testtime, run the quickstart on the embedded model
#   make test   create .venv, install testtime with test extras, run the test suite
# The first install compiles llama-cpp-python from source (about 6 minutes on
# 2 cores); pip caches the wheel, so later installs take seconds.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/testtime run

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/engine_throughput.py

clean:
	rm -rf $(VENV) testtime-runs
