# syntax=docker/dockerfile:1
#
# dgserve: an OpenAI-compatible server for DiffusionGemma. Two images from one file:
#
#   docker build -t dgserve .                                  # CUDA (the default): serves the real model
#   docker buildx build --platform linux/arm64 -t dgserve .    # the same for DGX Spark (or build on the Spark)
#   docker build -t dgserve:cpu --build-arg VARIANT=cpu .      # CPU only: serves the bundled demo model
#
# Configuration is the same as `dgserve serve`'s: every option reads DGSERVE_<NAME> from the environment (README,
# "Deploy with Docker"). The API key and the Hugging Face token are never baked in: pass them at run time.

# The CUDA base must ship a torch that satisfies pyproject's `torch>=2.6`, so that pip keeps it, and Python >= 3.11.
# NVIDIA's PyTorch container is published for linux/amd64 and linux/arm64 (DGX Spark, GH200) with a CUDA 13 torch
# built for every current GPU, Blackwell's sm100/sm120 and GB10's sm121 included: one tag builds natively on both.
ARG CUDA_BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
ARG CPU_BASE_IMAGE=python:3.11-slim-bookworm
# cuda or cpu. `FROM base-${VARIANT}` names one of the two stages below, not an image: hadolint cannot see that,
# hence its DL3006 (untagged image) is silenced on those two lines only.
ARG VARIANT=cuda

# ---- torch, per variant ---------------------------------------------------------------------------------------------
FROM ${CUDA_BASE_IMAGE} AS base-cuda
# torch built for CUDA comes with the base image. Without DGSERVE_MODEL, the GPU image serves the real checkpoint.
ENV DGSERVE_MODEL=google/diffusiongemma-26B-A4B-it

FROM ${CPU_BASE_IMAGE} AS base-cpu
ARG PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# The CPU wheel: on Linux an unpinned torch from the default index is a multi-GB CUDA build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
# No real weights fit a CPU: serve the bundled demo checkpoint (a tiny model trained on the Python manual).
ENV DGSERVE_MODEL=demo

# ---- build: the dependency list and the dgserve wheel ---------------------------------------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS build
ARG PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml ./
# pyproject's [project] dependencies as a requirements file: the runtime stage installs them in a layer that only a
# change to that list invalidates, not a change to the source.
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep=chr(10))" > requirements.txt
COPY README.md ./
COPY models ./models
COPY engine ./engine
COPY server ./server
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- runtime --------------------------------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
ARG UID=1000
WORKDIR /tmp/install

# Dependencies first, in their own cached layer. The constraint pins torch to the base image's build: pip keeps it,
# and a dependency that wanted another torch fails the build instead of pulling a second multi-GB copy.
COPY --from=build /src/requirements.txt ./
RUN python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > constraints.txt \
    && pip install --no-cache-dir -c constraints.txt -r requirements.txt

# Then dgserve itself: no dependency left to resolve. The import proves the install.
COPY --from=build /wheels/ ./wheels/
RUN pip install --no-cache-dir --no-deps ./wheels/*.whl \
    && python -c "import server.cli, torch; print('dgserve on torch', torch.__version__, 'CUDA', torch.version.cuda)" \
    && rm -rf /tmp/install

# A non-root user in group 0 with group-writable caches, so the image also runs under an arbitrary UID (`user:`).
# Named volumes mounted on these directories start out with this ownership. --non-unique: some bases have UID 1000.
ENV HOME=/home/dgserve \
    HF_HOME=/home/dgserve/.cache/huggingface \
    DGSERVE_CACHE=/home/dgserve/.cache/dgserve \
    TORCHINDUCTOR_CACHE_DIR=/home/dgserve/.cache/compile/inductor \
    TRITON_CACHE_DIR=/home/dgserve/.cache/compile/triton
RUN useradd --non-unique --uid "${UID}" --gid 0 --home-dir /home/dgserve --create-home --shell /usr/sbin/nologin \
        dgserve \
    && mkdir -p "${HF_HOME}" "${DGSERVE_CACHE}" "${TORCHINDUCTOR_CACHE_DIR}" "${TRITON_CACHE_DIR}" \
    && chown -R "${UID}:0" /home/dgserve \
    && chmod -R g=u /home/dgserve
# Weights (HF_HOME), the random-demo checkpoint (DGSERVE_CACHE) and compile caches live on volumes, not in the image.
VOLUME ["/home/dgserve/.cache/huggingface", "/home/dgserve/.cache/dgserve", "/home/dgserve/.cache/compile"]
WORKDIR /home/dgserve
USER ${UID}:0

# Inside a container the server listens on every interface; publish the port on 127.0.0.1 (docker-compose.yml does).
ENV DGSERVE_HOST=0.0.0.0 \
    DGSERVE_PORT=8000 \
    PYTHONUNBUFFERED=1
EXPOSE 8000

# /health answers once the weights are loaded and the engine thread runs: the start period covers downloading and
# loading 52 GB. Python, not curl: slim images have no curl.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('DGSERVE_PORT', '8000'), timeout=8)"]

# Exec form: dgserve itself receives SIGTERM, and uvicorn drains in-flight requests for DGSERVE_DRAIN_TIMEOUT seconds.
ENTRYPOINT ["dgserve"]
CMD ["serve"]
