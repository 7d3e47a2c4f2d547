# spnas-kfp: the verbs people type. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast lint bench compile run retrain schedule upload image push clean
IMAGE  ?= ghcr.io/spnas-kfp/spnas:0.1.0
CONFIG ?= configs/demo.yml
PARAMS ?=

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: $(STAMP) ## create .venv with every dependency (idempotent: a second call does nothing)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,store,export,serve,registry]'
	touch $(STAMP)

DEMO_DATA ?= data/demo
DEMO_RUN  ?= runs/demo

STORE_DIR ?= runs/objectstore

demo: install ## the main job: all five SP-NAS phases and their controls on demo data read from and published to a local S3 store, then the result exported behind the parity gate (~6 min)
	test -f $(DEMO_DATA)/annotations/instances_val2017.json || $(BIN)/spnas demo-data $(DEMO_DATA)
	test -n "$(DEMO_RUN)" && rm -rf "$(DEMO_RUN)/output"  # a fresh demo each time (spnas run --resume continues an interrupted one)
	$(BIN)/spnas objectstore start --dir $(STORE_DIR)
	eval "$$($(BIN)/spnas objectstore env --dir $(STORE_DIR))" \
	  && $(BIN)/spnas data upload $(DEMO_DATA) minio://spnas/datasets/demo \
	  && $(BIN)/spnas run configs/demo.yml --workdir $(DEMO_RUN) \
	       --set fine_tune.dataset.common.data_root=minio://spnas/datasets/demo \
	       --publish minio://spnas/runs/demo; \
	rc=$$?; $(BIN)/spnas objectstore stop --dir $(STORE_DIR); exit $$rc
	$(BIN)/spnas export --run $(DEMO_RUN)/output --data $(DEMO_DATA) --out $(DEMO_RUN)/export

lint: install ## ruff and the import-layers contract (also part of `make test`)
	$(BIN)/ruff check --no-cache .
	$(BIN)/lint-imports --no-cache

PYTEST_WORKERS ?= 2

test: lint ## lint, then every test (CPU, $(PYTEST_WORKERS) pytest workers); fails when any test fails
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist load $(PYTEST_ARGS)

test-fast: install ## the inner loop: every test not marked slow (under 2 minutes)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist load -m "not slow" $(PYTEST_ARGS)

bench: install ## run the benchmarks in bench/ (ratios measured side by side)
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

compile: install ## compile the SP-NAS and the retraining pipelines from $(CONFIG) to pipelines/*.yaml (IMAGE=...)
	$(BIN)/python -m pipelines.spnas_pipeline --config $(CONFIG) --output pipelines/spnas_pipeline.yaml --image $(IMAGE)
	$(BIN)/python -m pipelines.retrain_pipeline --config $(CONFIG) --output pipelines/retrain_pipeline.yaml --image $(IMAGE)

# run, schedule and upload are not echoed: PARAMS may carry --token (prefer KFP_TOKEN)
run: install ## submit the compiled pipeline to KFP_ENDPOINT (PARAMS="--param data_uri=s3://...")
	@$(BIN)/python -m pipelines.submit run $(PARAMS)

retrain: install ## one run of the retraining pipeline on KFP_ENDPOINT (PARAMS="--param data_uri=s3://... --param model_name=spnas")
	@$(BIN)/python -m pipelines.submit run --package pipelines/retrain_pipeline.yaml $(PARAMS)

schedule: install ## nightly retraining on KFP_ENDPOINT: no catch-up, one run at a time (CRON="0 0 2 * * *", PARAMS=...)
	@$(BIN)/python -m pipelines.submit schedule --cron "$(or $(CRON),0 0 2 * * *)" $(PARAMS)

upload: install ## upload the compiled pipeline (VERSION=v2 adds a version)
	@$(BIN)/python -m pipelines.submit upload $(if $(VERSION),--version $(VERSION)) $(PARAMS)

image: ## build the component image (needs Docker; IMAGE=...)
	docker build -f images/Dockerfile -t $(IMAGE) .

push: image ## push the component image
	docker push $(IMAGE)

clean: ## remove caches (keeps .venv)
	rm -rf .pytest_cache .hypothesis build dist *.egg-info
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
