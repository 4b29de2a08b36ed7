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

.PHONY: smoke test test-fast test-gpu gpu-wheels mutations install bench mlflow-ui clean image

$(STAMP): pyproject.toml requirements.txt cluster/install.sh
	# the same script as the image and the wheel test: torch first, then the project's
	# dependencies held to the tested pins; it fails if torch was replaced
	PYTHON=$(PY) TORCH_SPEC=$(TORCH) cluster/install.sh $(VENV) -e ".[serve,test]"
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default (local data, one process, CPU or one GPU).
smoke: $(STAMP)
	$(BIN)/python jobs/train.py

# The suite. Tests marked slow (each over ~20 s on 2 cores: clusters of several nodes, fresh
# venvs, `ray job submit`, the docs pages, Serve under load) run in CI (.ci/run sets CI=true)
# or with `make test SLOW=1`; without either, `make test` leaves them out (~15 min on 2 cores).
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25 $(if $(or $(CI),$(SLOW)),,-m "not slow") tests

# Unit tests only (~2 min), for iterating; `make test` and CI still run everything.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

# The GPU check (tests/gpu, <= 9 min on one GPU): CUDA training, DeepSpeed ZeRO 0-3 on NCCL in
# bf16 and fp32, offload, seeded sampling. With the project installed (.venv with a CUDA torch:
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 make install) it runs there. On a bare
# GPU machine (its own torch, no network) it first installs, from build/gpu-wheels made here by
# `make gpu-wheels` and carried along, only what that machine lacks (tests/gpu/prepare.py says
# what it has and needs). Skipped without a CUDA device.
test-gpu:
	@if [ -x $(BIN)/python ] && $(BIN)/python -c "import deepspeed, ray" 2>/dev/null; then \
	  $(BIN)/python -m pytest -q -rs -p no:cacheprovider tests/gpu; \
	else \
	  $(PY) tests/gpu/prepare.py $(GPU_WHEELS) build/gpu-site && \
	  PYTHONPATH=$(CURDIR)/build/gpu-site:$(CURDIR) $(PY) -m pytest -q -rs -p no:cacheprovider tests/gpu; \
	fi

# The offline wheels of DeepSpeed's stack and pytest for a bare GPU machine (~30 MB; no Ray,
# no MLflow). GPU_PYTHON: that machine's Python, if it differs from this one.
GPU_WHEELS := build/gpu-wheels
GPU_STACK  := einops hjson msgpack ninja numpy packaging psutil py-cpuinfo pydantic pydantic-core \
              annotated-types typing-inspection typing-extensions tqdm pyyaml pillow fsspec \
              pytest pluggy iniconfig pygments pytest-timeout webdataset braceexpand
gpu-wheels: $(STAMP)
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -c requirements.txt -w $(GPU_WHEELS) deepspeed
	$(BIN)/pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
	  --python-version $${GPU_PYTHON:-$$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')} \
	  -c requirements.txt -d $(GPU_WHEELS) $(GPU_STACK)
	echo $${GPU_PYTHON:-$$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')} > $(GPU_WHEELS)/PYTHON
	du -sh $(GPU_WHEELS)

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
