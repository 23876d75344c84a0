# LesionWatch — the two commands a newcomer needs: `make demo` and `make test`.
# Both create and fill the project's own virtual environment (.venv) on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench weights clean

# torch is pinned (==2.13.0) in pyproject.toml so no install resolves another build; GPU
# machines install their CUDA build of the same version first (see deploy/Dockerfile).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lesionwatch demo

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check service dicom_io pipelines models config tests
	$(BIN)/ruff format --check service dicom_io pipelines models config tests
	$(BIN)/mypy service dicom_io pipelines models config

weights: $(STAMP)
	$(BIN)/lesionwatch reproduce-weights --out build/reproduce-weights --install

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python tests/benchmarks/bench_ingest.py
	$(BIN)/python tests/benchmarks/bench_sliding_window.py
	$(BIN)/python tests/benchmarks/bench_training_step.py
	$(BIN)/python tests/benchmarks/bench_broker.py
	$(BIN)/python tests/benchmarks/bench_new_lesion_steps.py

clean:
	rm -rf $(VENV) var build *.egg-info
