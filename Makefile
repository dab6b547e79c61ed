# Quick start:  `make demo`  (set up .venv and run the end-to-end demo)
#               `make test`  (set up .venv and run the test suite)
PYTHON      ?= python3
VENV        ?= .venv
# Pins the CPU build of torch. GPU users: `make setup CONSTRAINTS=` keeps pip's CUDA default.
CONSTRAINTS ?= constraints/cpu.txt
PYTEST_ARGS ?=
DEMO_CONFIG ?= configs/demo.yaml

BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all lint clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/cryoorient run $(DEMO_CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check cryoorient_ray tests benchmarks
	$(BIN)/ruff format --check cryoorient_ray tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
