# llmrec-spark: `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DS ?= $(shell date -u +%F)
# `make dist` installs the wheel into this virtualenv and packs it; VENV_PACK_FLAGS=--python-prefix=/usr
# when the executors' Python lives elsewhere than this machine's.
PACK_VENV := build/pack-venv
VENV_PACK_FLAGS ?=
export PYSPARK_PYTHON := $(abspath $(BIN)/python)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: help install native-blas demo test test-fast test-slow test-gpu check bench clean-data dist cluster-demo test-cluster chromium screenshot

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/llmrec: pyproject.toml constraints.txt
	@echo "installing the pinned platform line into $(VENV) (a few minutes the first time)"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -qq -c constraints.txt -e '.[dev]'
	touch $(BIN)/llmrec

install: $(BIN)/llmrec native-blas  ## create .venv and install the package with the pinned platform line

# Spark MLlib (ALS) calls BLAS/LAPACK through dev.ludovic.netlib, which loads the system's
# libblas.so.3/liblapack.so.3 when there is one and otherwise falls back to Java.
NATIVE_BLAS_PACKAGE := libopenblas0-pthread
native-blas:  ## native OpenBLAS for Spark MLlib (apt-get, when root); else a note and Java BLAS
	@libs="$$(PATH="$$PATH:/sbin:/usr/sbin" ldconfig -p 2>/dev/null)"; \
	if grep -q 'libblas\.so\.3 ' <<<"$$libs" && grep -q 'liblapack\.so\.3 ' <<<"$$libs"; then \
		exit 0; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $(NATIVE_BLAS_PACKAGE) (native BLAS/LAPACK for Spark MLlib)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq --no-install-recommends $(NATIVE_BLAS_PACKAGE) >/dev/null 2>&1 \
		|| { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends $(NATIVE_BLAS_PACKAGE) >/dev/null; } \
		|| echo "note: apt-get could not install $(NATIVE_BLAS_PACKAGE); Spark MLlib falls back to Java BLAS (slower ALS)"; \
	else \
		echo "note: no native BLAS (libblas.so.3) and no root apt-get; Spark MLlib uses Java BLAS (slower ALS). Install $(NATIVE_BLAS_PACKAGE) or another libblas.so.3 provider to fix"; \
	fi

demo: install  ## generate demo data and run the whole nightly pipeline on the embedded default
	$(BIN)/llmrec generate-demo --ds $(DS)
	$(BIN)/llmrec nightly --ds $(DS)

test: check  ## what CI runs: lint and types, then every test that runs here (slow, faults, notebooks, cluster)
	$(BIN)/pytest -q -m "not gpu" --durations=15

test-fast: install  ## the quick suite for local work (no slow, cluster or gpu tests)
	$(BIN)/pytest -q

test-slow: install  ## only the slow tests (heavier end-to-end, fault and notebook tests)
	$(BIN)/pytest -q -m slow

test-gpu: install  ## the gpu tests (need CUDA; skipped without it): encoder and training step vs the CPU
	$(BIN)/pytest -q -m gpu

check: install  ## lint, format check, type check and the layering contracts (pyproject's [tool.importlinter])
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy llmrec_spark
	$(BIN)/lint-imports --no-cache

dist: install  ## build the wheel and a packed virtualenv (dist/llmrec-venv.tar.gz) for spark-submit --archives
	rm -f dist/llmrec_spark-*.whl
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w dist .
	test -x $(PACK_VENV)/bin/python || $(BIN)/python -m venv $(PACK_VENV)
	$(PACK_VENV)/bin/pip install -qq -c constraints.txt dist/llmrec_spark-*.whl
	$(PACK_VENV)/bin/pip install -qq --no-deps --force-reinstall dist/llmrec_spark-*.whl
	$(BIN)/venv-pack -q -p $(PACK_VENV) -o dist/llmrec-venv.tar.gz --force --compress-level 1 $(VENV_PACK_FLAGS)
	chmod 644 dist/llmrec-venv.tar.gz
	@ls -lh dist/llmrec_spark-*.whl dist/llmrec-venv.tar.gz

cluster-demo: install  ## start a standalone Spark master + 2 workers on 127.0.0.1, run the nightly on it, stop them
	$(BIN)/python -m llmrec_spark.runtime.cluster demo --ds $(DS)

test-cluster: install  ## the cluster tests (a standalone cluster on loopback)
	$(BIN)/pytest -q -m cluster

# A report as a reader sees it: headless Chromium renders it to a PNG beside the HTML.
REPORT ?= $(shell ls -t reports/*.html 2>/dev/null | head -1)
chromium:  ## Debian's Chromium for `make screenshot` (apt-get, when root)
	@command -v chromium >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium (headless rendering of the reports; a few minutes)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
		|| { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; \
	else \
		echo "no chromium and no root apt-get: install Debian's chromium package, then rerun"; exit 1; \
	fi

screenshot: install chromium  ## render a report (REPORT=path.html; default the newest in reports/) to path.png
	@test -n "$(REPORT)" && test -f "$(REPORT)" || { echo "no report to render: run \`make demo\` or pass REPORT=path.html"; exit 1; }
	$(BIN)/python -c 'import sys; from llmrec_spark.evaluation.screenshot import screenshot; \
		sys.exit(0 if screenshot(sys.argv[1], sys.argv[2], height=int(sys.argv[3])) else 1)' \
		"$(REPORT)" "$(basename $(REPORT)).png" "$${HEIGHT:-3000}"
	@echo "wrote $(basename $(REPORT)).png"

clean-data:  ## remove demo data, tables, MLflow store and reports
	rm -rf landing lakehouse mlruns mlflow.db reports bench-results
