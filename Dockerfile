# dgserve: an OpenAI-compatible server for DiffusionGemma. Three images from one file, chosen by VARIANT:
#
#   docker build -t dgserve:cuda12 .                            # NVIDIA driver >= 570 (CUDA 12.8): the default
#   docker build -t dgserve:cuda13 --build-arg VARIANT=cuda13 . # NVIDIA driver >= 580 (CUDA 13.0), DGX Spark
#   docker build -t dgserve:cpu --build-arg VARIANT=cpu .       # CPU only: serves the bundled demo model
#
# BuildKit is not required: the legacy builder also builds only what VARIANT needs (the variant stages below set
# environment variables only; torch is installed once, in the runtime stage, for the chosen variant).
# Configuration is the same as `dgserve serve`'s: every option reads DGSERVE_<NAME> from the environment (README,
# "Deploy with Docker"). The API key and the Hugging Face token are never baked in: pass them at run time.
#
# Torch, in every variant: PyTorch's own wheel of the version the tests run, so that F.grouped_mm (torch >= 2.10) is
# there and the GPU image computes what the CPU tests check. Facts behind this choice (checked December 2026):
#   - NVIDIA's NGC image (nvcr.io/nvidia/pytorch, this file's former base) ships torch pre-releases that trail: 25.12
#     is torch 2.10.0a0 on CUDA 13.1.0 (https://docs.nvidia.com/deeplearning/frameworks/pytorch-release-notes/
#     rel-25-12.html); 25.09 is torch 2.9 on CUDA 13.0 (no F.grouped_mm, driver >= 580; ../shared/gpu-audit.md);
#     the CUDA 12.8 tags that a 570 driver runs (25.01-25.03) carry torch 2.6-2.7, before even torch._grouped_mm
#     (2.8). No NGC tag serves both a 570 driver and a torch with grouped GEMMs, hence two CUDA variants here.
#   - Driver floor (https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html): CUDA 13.x
#     needs a driver >= 580; CUDA 12.x runs on >= 525 with a limited feature set, and CUDA 12.8's own driver is 570.
#     The data-center forward-compatibility package (cuda-compat) does not help consumer (RTX) cards: their driver
#     must meet the floor itself.
#   - PyTorch publishes cu128 and cu130 wheels of each release (torch 2.9, 2.10 and 2.11 all have both:
#     replicate/cog's pkg/config/torch_compatibility.json, generated from download.pytorch.org), for linux aarch64
#     too since torch 2.9 (its release notes; not re-checked here, as 2.13.0's presence on cu128/cu130 is not: no
#     network here). If TORCH_VERSION is missing for a variant, the pip install fails the build: pass another.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# cuda12, cuda13 or cpu. `FROM variant-${VARIANT}` names a stage below, not an image: hadolint cannot see that,
# hence its DL3006 (untagged image) is silenced on that line only.
ARG VARIANT=cuda12
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl
# The version the tokenizer and the parity tests run against (pyproject's test extra): the image gets the same.
ARG TRANSFORMERS_VERSION=5.23.0

# ---- per-variant settings (environment only: nothing here is large) -------------------------------------------------
FROM ${PYTHON_IMAGE} AS variant-cpu
# No real weights fit a CPU: serve the bundled demo checkpoint (a tiny model trained on the Python manual).
ENV DGSERVE_MODEL=demo

FROM ${PYTHON_IMAGE} AS variant-cuda12
# The real checkpoint, on the GPU or not at all: without a usable GPU the server exits naming the driver it found,
# `nvidia-smi` and the NVIDIA Container Toolkit, instead of loading 101 GB of fp32 weights on the CPU.
ENV DGSERVE_MODEL=google/diffusiongemma-26B-A4B-it \
    DGSERVE_DEVICE=cuda

FROM variant-cuda12 AS variant-cuda13

# ---- build: the dependency list and the dgserve wheel (pure Python: no torch needed) ---------------------------------
FROM ${PYTHON_IMAGE} AS build
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
FROM variant-${VARIANT} AS runtime
ARG PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
ARG VARIANT
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ARG TRANSFORMERS_VERSION
ARG UID=1000
WORKDIR /tmp/install

# Torch first, from the wheel index of the variant: on Linux an unpinned torch from PyPI is some CUDA build.
RUN case "${VARIANT}" in \
        cpu) wheels=cpu ;; \
        cuda12) wheels=cu128 ;; \
        cuda13) wheels=cu130 ;; \
        *) echo "VARIANT must be cuda12, cuda13 or cpu, not '${VARIANT}'" >&2; exit 1 ;; \
    esac \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}/${wheels}" "torch==${TORCH_VERSION}"

# Dependencies next, in their own cached layer. The constraints keep that torch (a dependency that wanted another
# fails the build instead of pulling a second multi-GB copy) and pin transformers to the tested version.
COPY --from=build /src/requirements.txt ./
RUN python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > constraints.txt \
    && echo "transformers==${TRANSFORMERS_VERSION}" >> constraints.txt \
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
# The Host check still answers only localhost, 127.0.0.1 and ::1: add the names clients use with
# DGSERVE_ALLOWED_HOSTS. The drain fits Docker's default 10 s stop grace (`docker stop`, `docker run` without
# --stop-timeout): raise DGSERVE_DRAIN_TIMEOUT together with --stop-timeout (compose sets both). A lone container has
# no router to warn, so the whole drain goes to the requests in flight: no announce (the fleet compose sets one).
ENV DGSERVE_HOST=0.0.0.0 \
    DGSERVE_PORT=8000 \
    DGSERVE_DRAIN_TIMEOUT=5 \
    DGSERVE_DRAIN_ANNOUNCE=0 \
    DGSERVE_URL_FILE=/tmp/dgserve.url \
    PYTHONUNBUFFERED=1
EXPOSE 8000

# /health answers once the weights are loaded and the engine thread runs: the start period covers downloading and
# loading 52 GB. The server writes the URL it listens on to DGSERVE_URL_FILE, so `serve --port` moves the probe too.
# Python, not curl: slim images have no curl.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(open(os.environ['DGSERVE_URL_FILE']).read().strip() + '/health', timeout=8)"]

# Exec form: dgserve itself receives SIGTERM, and drains in-flight requests for DGSERVE_DRAIN_TIMEOUT seconds.
ENTRYPOINT ["dgserve"]
CMD ["serve"]
