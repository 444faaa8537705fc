#!/usr/bin/env bash
# Every GPU check of silotune's compute placement, run as-is on a machine with CUDA (offline).
# Usage: bash bench/gpu_checks.sh [--quick]   (quick: smaller data, no 1B/7B throughput or 7B memory)
# Results: results/gpu-checks-<gpu name>/<part>.json, one file per part, plus the log.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 \
  MLFLOW_ENABLE_TELEMETRY=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
gpu=$("$PY" -c "import re,torch; print(re.sub(r'[^a-z0-9]+','-',torch.cuda.get_device_name(0).lower()).strip('-'))") || {
  echo "no CUDA device"; exit 2; }
mkdir -p "results/gpu-checks-$gpu"
# Each part has its own time limit, so one slow part does not take the others' time.
status=0
for part in federation dpsgd shape1b ddp memory throughput; do
  case $part in throughput) limit=${THROUGHPUT_S:-300};; memory) limit=${MEMORY_S:-240};; *) limit=${PART_S:-150};; esac
  timeout "$limit" "$PY" bench/gpu_checks.py --parts "$part" "$@" 2>&1 | tee -a "results/gpu-checks-$gpu/log.txt"
  rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && { echo "part $part: exit $rc"; status=1; }
done
exit $status
