# The image every cluster config runs (cluster/aws-gpu.yaml, cluster/rayjob.yaml,
# cluster/rayservice.yaml): CUDA runtime, Python >= 3.11, the pinned stack and the project,
# installed by cluster/install.sh like `make install` and the wheel test, run as the
# non-root user `ray` (uid 1000, HOME /home/ray, as Ray's own images and the launcher expect).
#
#   make image                      # docker build -t $(IMAGE) .   (see the Makefile)
#   make image IMAGE=registry.example.com/team/vdvae-dist:0.1.0 && docker push ...
#
# Build arguments:
#   BASE_IMAGE       a CUDA runtime base with Python >= 3.11 as python3 (Ubuntu 24.04: 3.12)
#   TORCH_SPEC       the torch build, installed first (default the tested torch==2.13.0)
#   TORCH_INDEX_URL  where torch comes from; the CUDA 12.8 wheels by default
#                    (empty: the ordinary index, e.g. a CPU build for a CPU-only image)
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# python3-venv: the venv install.sh creates; g++ and python3-dev: DeepSpeed compiles its
# ops when first used (its CPU accelerator's shared-memory collectives on CPU workers);
# rsync and openssh-client: the Ray cluster launcher copies files into the container with
# rsync and its autoscaler, running in the head's container, reaches the workers over ssh;
# tini reaps the processes Ray leaves behind
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev g++ ca-certificates rsync openssh-client tini \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -c 'import sys, tomllib; assert sys.version_info >= (3, 11), sys.version'

# uid 1000 is `ubuntu` in Ubuntu 24.04 images; Ray's images and the launcher use `ray`
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
 && useradd --create-home --uid 1000 --shell /bin/bash ray

# Only what the install needs, so an edit elsewhere keeps this layer's cache
WORKDIR /app
COPY pyproject.toml requirements.txt README.md ./
COPY cluster/install.sh cluster/install.sh
COPY vdvae_dist vdvae_dist
COPY jobs jobs
RUN PIP_NO_CACHE_DIR=1 PYTHON=python3 TORCH_SPEC="${TORCH_SPEC}" TORCH_INDEX_URL="${TORCH_INDEX_URL}" \
      cluster/install.sh /opt/venv "/app[serve]"

# Login shells (the launcher's `docker exec ... bash --login`, KubeRay's `bash -lc`) reset
# PATH in /etc/profile; this puts the venv back in front for them too
RUN printf 'export PATH=/opt/venv/bin:$PATH\n' > /etc/profile.d/venv.sh

ENV PATH=/opt/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/venv \
    HOME=/home/ray \
    PYTHONUNBUFFERED=1
USER ray
WORKDIR /home/ray
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["vdvae-dist", "--help"]
