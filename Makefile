# The two commands a user needs: `make demo` and `make test`. Each sets itself up.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lint venv tools bench bench-pipeline bench-server bench-autoscale clean

# The venv is rebuilt only when the project's dependency files change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Debian tools the checks call (packer validate, shellcheck); installed once when missing.
tools:
	@command -v packer >/dev/null && command -v shellcheck >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq packer shellcheck >/dev/null; }

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) tools lint
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=12 tests

demo: $(STAMP)
	$(BIN)/python -m nlpfleet.local_demo

# Benchmarks print their comparison tables and write JSON/PNG under bench/results/.
# The pipeline benchmark trains for tens of minutes on 2 cores; the others take a few.
bench: bench-pipeline bench-server bench-autoscale
bench-pipeline: $(STAMP)
	$(BIN)/python bench/bench_pipeline.py
# The Banking77 model of bench-pipeline when it exists (the production setup), else a fixture.
bench-server: $(STAMP)
	if [ -f out/bench-pipeline/artifact/manifest.json ] && [ -d out/bench-pipeline/run/model ]; then \
	  $(BIN)/python bench/bench_server.py --model out/bench-pipeline/artifact --naive-model out/bench-pipeline/run/model; \
	else $(BIN)/python bench/bench_server.py; fi
bench-autoscale: $(STAMP)
	$(BIN)/python bench/autoscale_sim.py --split 1995-07-15 --out bench/results/autoscale_july.png

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
