#!/usr/bin/env bash
# The README's first command: install, then run the demo federation of
# SmolLM2-135M-Instruct over three non-IID silos (about ten minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/install.sh
exec .venv/bin/silotune demo "$@"
