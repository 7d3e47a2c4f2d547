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

DEMO_DATA ?= data/demo
DEMO_RUN  ?= runs/demo

demo: install ## the main job: all five SP-NAS phases on generated demo data (~4 min on 2 CPU cores)
	test -f $(DEMO_DATA)/annotations/instances_val2017.json || $(BIN)/spnas demo-data $(DEMO_DATA)
	$(BIN)/spnas run configs/demo.yml --workdir $(DEMO_RUN) --set fine_tune.dataset.common.data_root=$(DEMO_DATA)

test: install ## run every test (CPU); fails when any test fails
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install ## run the benchmarks in bench/ (ratios measured side by side)
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean: ## remove caches (keeps .venv)
	rm -rf .pytest_cache .hypothesis build dist *.egg-info
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
