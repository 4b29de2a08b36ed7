# Two commands for a newcomer: `make smoke` (install + main job) and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
STAMP   := $(VENV)/.installed
# The image the cluster configs run (cluster/*.yaml name this tag; a test keeps them equal).
# Push it to a registry your nodes can pull from: `make image IMAGE=<registry>/vdvae-dist:0.1.0`
# and change the tag in cluster/*.yaml to match (docs/cluster-launcher.md, docs/kuberay.md).
IMAGE   ?= ghcr.io/example/vdvae-dist:0.1.0
DOCKER  ?= docker

.PHONY: smoke test test-fast test-gpu mutations install bench mlflow-ui clean image

$(STAMP): pyproject.toml requirements.txt cluster/install.sh
	# the same script as the image and the wheel test: torch first, then the project's
	# dependencies held to the tested pins; it fails if torch was replaced
	PYTHON=$(PY) TORCH_SPEC=$(TORCH) cluster/install.sh $(VENV) -e ".[serve,test]"
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default (local data, one process, CPU or one GPU).
smoke: $(STAMP)
	$(BIN)/python jobs/train.py

# The whole suite, slow tests included (CI runs exactly this).
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 tests

# Unit tests only (~2 min), for iterating; `make test` and CI still run everything.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

# The CUDA smoke tests on a machine with a GPU (install there with the CUDA torch:
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 make install); skipped without one.
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -rs tests/gpu

# Every mutation of tests/mutations/*.toml, applied to a scratch copy, must fail its tests.
mutations: $(STAMP)
	$(BIN)/python tests/run_mutations.py

# The MLflow UI over the embedded local store (runs of `make smoke` / jobs/train.py).
mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --host 127.0.0.1 --port 5000

# Benchmarks print side-by-side ratios; results and commands are in benchmarks/RESULTS.md.
bench: $(STAMP)
	$(BIN)/python benchmarks/model_step.py
	$(BIN)/python benchmarks/data_stream.py
	$(BIN)/python benchmarks/scaling.py
	$(BIN)/python benchmarks/serve_load.py

# The CUDA image (Dockerfile) for the cluster configs; a separate command: CI builds no images.
# CPU-only variant: make image IMAGE=... DOCKER_BUILD_ARGS="--build-arg TORCH_INDEX_URL="
image:
	$(DOCKER) build $(DOCKER_BUILD_ARGS) -t $(IMAGE) .
	$(DOCKER) run --rm $(IMAGE) vdvae-dist --help

clean:
	rm -rf $(VENV) runs mlruns .pytest_cache
