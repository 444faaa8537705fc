#!/usr/bin/env bash
# The README's second command (and what CI runs): install with test tools, lint, test.
# Most tests need no server: Prefect runs on its ephemeral API (a temporary local
# server on 127.0.0.1 started by the test harness), MLflow on a SQLite file. The
# stack tests (marker `stack`) start SeaweedFS, a Prefect server, an MLflow server
# and workers themselves, on free ports of 127.0.0.1, and stop them again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/install.sh --dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 MLFLOW_ENABLE_TELEMETRY=false
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -p no:cacheprovider --timeout=900 "$@"
