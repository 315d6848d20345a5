# syntax=docker/dockerfile:1
# blipserve images. Default target: GPU (CUDA runtime + a CUDA build of torch).
#   docker build -t blipserve .                    # GPU
#   docker build -t blipserve:cpu --target cpu .   # CPU, for trying it out
#   docker run --gpus all -p 8000:8000 -v hf:/cache blipserve --model Salesforce/blip2-opt-2.7b

ARG PYTHON_VERSION=3.11

# ---- CPU image -------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HOME=/cache
RUN useradd --create-home --uid 10001 blipserve && mkdir -p /cache && chown blipserve /cache
WORKDIR /app
# Dependencies first (own layer, cached while the source changes).
COPY pyproject.toml README.md ./
# The dependency list lives in pyproject.toml only: install it against empty package folders, then drop
# the stub (torch first, so the range in pyproject.toml keeps this build).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && mkdir model batching server && pip install . && pip uninstall -y blipserve && rm -r model batching server build blipserve.egg-info
COPY model/ model/
COPY batching/ batching/
COPY server/ server/
COPY configs/ configs/
RUN pip install --no-deps .
USER 10001
VOLUME ["/cache"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"]
# Exec form: SIGTERM reaches the server, which drains accepted requests before exiting.
ENTRYPOINT ["blipserve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--device", "cpu"]

# ---- GPU image (default) ---------------------------------------------------------------------------
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS gpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HOME=/cache \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && useradd --create-home --uid 10001 blipserve && mkdir -p /cache && chown blipserve /cache
WORKDIR /app
COPY pyproject.toml README.md ./
# PyPI's Linux torch wheel is the CUDA build.
RUN pip install torch==2.13.0 \
 && mkdir model batching server && pip install . && pip uninstall -y blipserve && rm -r model batching server build blipserve.egg-info
COPY model/ model/
COPY batching/ batching/
COPY server/ server/
COPY configs/ configs/
RUN pip install --no-deps .
USER 10001
VOLUME ["/cache"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"]
ENTRYPOINT ["blipserve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--config", "blip2-opt-2.7b"]
