# Every target creates .venv when missing and installs what it needs.
# The pinned CPU wheel of torch is installed first so nothing pulls CUDA packages.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test test-all bench bench-quick mutation lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev,lightning,tune,ray]"
	touch $(DEV_STAMP)

$(BENCH_STAMP): $(DEV_STAMP)
	$(BIN)/pip install --quiet -e ".[dev,lightning,tune,ray,bench]"
	touch $(BENCH_STAMP)

demo: $(STAMP)
	$(BIN)/modaldiag demo --out demo-out --overwrite

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q

test-all: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.reliability

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run --quick

mutation: $(DEV_STAMP)
	$(BIN)/python benchmarks/mutation.py --sample 64 --seed 0 --out benchmarks/results/mutation.json

lint: $(DEV_STAMP)
	$(BIN)/ruff check modaldiag tests examples benchmarks

clean:
	rm -rf $(VENV) demo-out .pytest_cache
