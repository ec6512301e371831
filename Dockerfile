# rfserve on a CUDA runtime image. Build:  docker build -t rfserve .
# With the Ray Serve extra:               docker build --build-arg EXTRAS=ray -t rfserve:ray .
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# Stage 1: a virtual environment with torch and rfserve; build tools stay in this stage.
FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG EXTRAS=""
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Unpinned apt packages: the archive drops old versions; the base image tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and alone: the largest layer, cached across source changes.
RUN pip install "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY rfserve ./rfserve
# The project itself, from this context, with the dependency versions its tests passed with (constraints.txt,
# resolved for every platform and Python >= 3.11 by .ci/lock.sh).
# hadolint ignore=DL3013
RUN pip install -c constraints.txt ".${EXTRAS:+[$EXTRAS]}"

# Stage 2: the runtime, with the venv and the Ray Serve app, run as an unprivileged user.
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin rfserve \
    && mkdir -p /data/hf \
    && chown rfserve:rfserve /data/hf
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY deploy/ray_serve.py ./deploy/ray_serve.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data/hf
# Downloaded weights outlive the container; mount a named volume or a host folder here.
VOLUME ["/data/hf"]
USER 10001
EXPOSE 8000
# /health is liveness only (200 while loading); readiness is /ready, probed by orchestrators.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# With no --model, the embedded rf-shapes model is served; pass flags after the image name.
ENTRYPOINT ["rfserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
