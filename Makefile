# Two commands do all set-up on a fresh machine:
#   make run    create .venv, install testtime, run the quickstart on the embedded model
#   make test   create .venv, install testtime with test extras and torch, run the test suite
# The first set-up compiles llama-cpp-python from source, portably, with every
# CPU variant of ggml's backend (scripts/build-llama.sh says why; about 15
# minutes on 2 cores). The wheel is kept in ~/.cache/testtime/wheels, so later
# set-ups take seconds.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := $(VENV)/.finetune
LLAMA_CPP_PYTHON := 0.3.36

.PHONY: run test bench clean

$(STAMP): pyproject.toml scripts/build-llama.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	wheels=$$(scripts/build-llama.sh $(BIN)/pip $(LLAMA_CPP_PYTHON)) && \
	$(BIN)/pip install --quiet --find-links "$$wheels" --only-binary llama-cpp-python \
		'llama-cpp-python==$(LLAMA_CPP_PYTHON)' -e '.[test]'
	touch $(STAMP)

# the tests also fine-tune a verifier: torch and transformers (torch pinned to the
# release whose CPU wheel is on the CI machines' disk; elsewhere pip fetches PyPI's
# wheel of it, which on Linux carries CUDA: install the CPU build first to avoid that)
$(TORCH): $(STAMP)
	$(BIN)/pip install --quiet 'torch==2.13.0' -e '.[finetune]'
	touch $(TORCH)

run: $(STAMP)
	$(BIN)/testtime run

test: $(STAMP) $(TORCH)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/engine_throughput.py

clean:
	rm -rf $(VENV) testtime-runs
