#!/usr/bin/env bash
# The README's first command: install, then run the demo federation of
# SmolLM2-135M-Instruct over three non-IID silos (about ten minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/install.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 MLFLOW_ENABLE_TELEMETRY=false
exec .venv/bin/silotune demo "$@"
