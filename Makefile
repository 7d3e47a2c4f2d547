# spnas-kfp: the verbs people type. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test bench clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: $(STAMP) ## create .venv with every dependency (idempotent: a second call does nothing)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install ## the main job (today: describe the seed architecture and a parallel child)
	$(BIN)/spnas describe --code 111-2111-211111-211
	$(BIN)/spnas describe --code r_111-2111-211111-211_0-1-0-1

test: install ## run every test (CPU); fails when any test fails
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install ## run the benchmarks in bench/ (ratios measured side by side)
	$(BIN)/python bench/forward_latency.py

clean: ## remove caches (keeps .venv)
	rm -rf .pytest_cache .hypothesis build dist *.egg-info
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
