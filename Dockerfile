# blipserve images. Default target: GPU (CUDA runtime + a CUDA build of torch).
#   docker build -t blipserve .                    # GPU
#   docker build -t blipserve:cpu --target cpu .   # CPU, for trying it out
#   docker run --gpus all -p 8000:8000 -v hf:/cache blipserve --model Salesforce/blip2-opt-2.7b
# Build arguments, for a mirror or an offline build (tests/test_docker.py builds both targets this way):
#   CPU_BASE, GPU_BASE   the base images (defaults below); any Debian/Ubuntu image with python3 + venv
#   TORCH_INDEX_URL      where torch (and its dependencies) come from: pytorch.org's CPU index for the CPU
#                        image, PyPI (CUDA builds) for the GPU image
#   TORCH_VERSION        2.13.0
# The other dependencies come from PyPI (pip's own PIP_INDEX_URL / PIP_CERT in the base image apply).

ARG PYTHON_VERSION=3.11
ARG CPU_BASE=python:${PYTHON_VERSION}-slim
ARG GPU_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---- CPU image -------------------------------------------------------------------------------------
FROM ${CPU_BASE} AS cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HOME=/cache \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv \
 && useradd --create-home --uid 10001 blipserve && mkdir -p /cache && chown blipserve /cache
WORKDIR /src
# Dependencies first, in a layer of their own that only a change of pyproject.toml rebuilds: torch from its
# index (so that the range in pyproject.toml keeps this build), then the list in pyproject.toml, installed
# against empty package folders (and a stand-in README) before the stub is dropped.
COPY pyproject.toml ./
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION" \
 && mkdir model batching server configs && touch README.md \
 && pip install . && pip uninstall -y blipserve \
 && rm -r model batching server configs build ./*.egg-info README.md
COPY README.md ./
COPY model/ model/
COPY batching/ batching/
COPY server/ server/
COPY configs/ configs/
# Not editable, and the sources removed: the server runs from site-packages, presets (configs/) included.
RUN pip install --no-deps . && rm -r /src
WORKDIR /home/blipserve
USER 10001
VOLUME ["/cache"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"]
# Exec form: SIGTERM reaches the server, which drains accepted requests before exiting.
ENTRYPOINT ["blipserve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--device", "cpu"]

# ---- GPU image (default) ---------------------------------------------------------------------------
FROM ${GPU_BASE} AS gpu
ARG TORCH_VERSION=2.13.0
# PyPI's Linux torch wheel is the CUDA build.
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HOME=/cache \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && useradd --create-home --uid 10001 blipserve && mkdir -p /cache && chown blipserve /cache
WORKDIR /src
COPY pyproject.toml ./
# The same steps as the CPU image, with the llm-int8 extra (bitsandbytes, for --quantize llm.int8); the
# versions are pyproject.toml's (hadolint takes ".[llm-int8]" for an unpinned package).
# hadolint ignore=DL3013
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION" \
 && mkdir model batching server configs && touch README.md \
 && pip install ".[llm-int8]" && pip uninstall -y blipserve \
 && rm -r model batching server configs build ./*.egg-info README.md
COPY README.md ./
COPY model/ model/
COPY batching/ batching/
COPY server/ server/
COPY configs/ configs/
RUN pip install --no-deps . && rm -r /src
WORKDIR /home/blipserve
USER 10001
VOLUME ["/cache"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"]
ENTRYPOINT ["blipserve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--config", "blip2-opt-2.7b"]
