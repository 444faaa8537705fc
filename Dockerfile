# syntax=docker/dockerfile:1
# One image for every silotune process: the Prefect server, MLflow, the coordinator's worker and the
# silos' workers (compose files in infra/compose/, Kubernetes manifests in infra/k8s/).
#
#   docker build -t silotune:cpu .                                              # CPU torch wheel
#   docker build -t silotune:cu128 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# The CUDA variant differs only in the torch wheel: it brings its own CUDA runtime (the nvidia-*
# wheels), so the host needs the NVIDIA driver and container toolkit, not a CUDA base image.
# Everything else is pinned by infra/constraints.txt through infra/install.sh, as on a workstation.
# No secret is baked in: S3 keys, the Prefect API auth string, MLflow passwords, the CA and the
# silos' keys arrive at run time as environment variables from env files, or as mounted secrets.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG UID=10001

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SILOTUNE_HOME=/opt/silotune \
    SILOTUNE_VENV=/opt/venv \
    SILOTUNE_CACHE=/var/cache/silotune \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    MLFLOW_ENABLE_TELEMETRY=false

WORKDIR /opt/silotune
# Dependencies first (changes to the code do not re-download torch): install.sh needs only these files
# to resolve; the editable install then points at the code copied below.
COPY pyproject.toml README.md ./
COPY infra/install.sh infra/constraints.txt infra/
COPY silotune/__init__.py silotune/
COPY flows/__init__.py flows/
COPY tasks/__init__.py tasks/
COPY ops/__init__.py ops/
COPY cli/__init__.py cli/
RUN SILOTUNE_TORCH_SPEC="torch==${TORCH_VERSION} --index-url ${TORCH_INDEX}" bash infra/install.sh \
    && /opt/venv/bin/python -m pip install -q -c infra/constraints.txt -e ".[image]"

COPY . .
# The folders the compose files mount named volumes on: a new volume takes their owner (the user).
RUN useradd --uid "${UID}" --user-group --create-home --shell /usr/sbin/nologin silotune \
    && mkdir -p /var/cache/silotune /var/lib/silotune/prefect /var/lib/silotune/seaweedfs \
        /var/lib/silotune/private /var/lib/silotune/coordinator/keys \
    && chmod 0700 /var/lib/silotune/private /var/lib/silotune/coordinator/keys \
    && chown -R silotune:silotune /var/cache/silotune /var/lib/silotune

ENV PATH=/opt/venv/bin:$PATH
# Numeric, so that Kubernetes runAsNonRoot can verify it without reading /etc/passwd.
USER ${UID}:${UID}
# The Prefect API this process talks to answers /health (a server: its own; a worker: the coordinator's,
# with the pinned CA). Compose and Kubernetes replace this probe where a service has a better one.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "/opt/silotune/infra/docker/healthcheck.py"]
ENTRYPOINT []
CMD ["silotune", "--help"]
