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
# The multi-host tests (tests/multihost: network namespaces, TLS, PostgreSQL; about 10 minutes here)
# run when asked: SILOTUNE_MULTIHOST=1 bash infra/test.sh, or bash infra/test.sh tests/multihost.
if [[ $# -eq 0 && "${SILOTUNE_MULTIHOST:-0}" != "1" ]]; then
    set -- -m "not multihost"
fi
.venv/bin/python -m pytest -q -p no:cacheprovider --timeout=900 --durations=25 "$@"
