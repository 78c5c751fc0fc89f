# llmrec-spark: `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DS ?= $(shell date -u +%F)
export PYSPARK_PYTHON := $(abspath $(BIN)/python)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: help install demo test test-slow check bench clean-data

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/llmrec: pyproject.toml constraints.txt
	@echo "installing the pinned platform line into $(VENV) (a few minutes the first time)"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -qq -c constraints.txt -e '.[dev]'
	touch $(BIN)/llmrec

install: $(BIN)/llmrec  ## create .venv and install the package with the pinned platform line

demo: install  ## generate demo data and run the whole nightly pipeline on the embedded default
	$(BIN)/llmrec generate-demo --ds $(DS)
	$(BIN)/llmrec nightly --ds $(DS)

test: install  ## the default test suite (no slow, cluster or gpu tests)
	$(BIN)/pytest -q

test-slow: install  ## the slow tests (heavier end-to-end and fault tests)
	$(BIN)/pytest -q -m slow

check: install  ## lint, format check and type check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy llmrec_spark

clean-data:  ## remove demo data, tables, MLflow store and reports
	rm -rf landing lakehouse mlruns mlflow.db reports bench-results
