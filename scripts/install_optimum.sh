#!/usr/bin/env bash
# Install Hugging Face optimum's ONNX Runtime classes (ORTModelForCausalLM) in a private venv.
#
# Why a side venv: optimum-onnx 0.1.0 (where optimum.onnxruntime now lives) requires
# transformers < 4.58, and the project's venv has transformers 5.x. The tests run this venv's
# python as a subprocess on an export folder, as a user deploying with optimum would.
#
# Everything goes under $MLX_TRANSFORMER_OPTIMUM_HOME (default ~/.cache/mlx-transformer/optimum):
#   venv/      the virtual environment (torch CPU, optimum, optimum-onnx, transformers 4.57)
#   stamp      the pinned requirements it was built from; a second run with the same pins only
#              checks that the package is still there
# Pins: the versions that resolve together from PyPI (measured Dec 2026; full install ~3 min).
#
# Usage: scripts/install_optimum.sh [PYTHON]   (the interpreter to build the venv from; default
# python3, else the project's .venv python). MLX_TRANSFORMER_NO_OPTIMUM=1 skips it (the optimum
# tests then skip, saying why).
set -euo pipefail

HOME_DIR="${MLX_TRANSFORMER_OPTIMUM_HOME:-$HOME/.cache/mlx-transformer/optimum}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$HOME_DIR/venv"
REQUIREMENTS=(
  torch==2.13.0
  optimum==2.1.0
  optimum-onnx==0.1.0
  transformers==4.57.6
  onnxruntime==1.32.0
)
say() { printf 'install_optimum: %s\n' "$*" >&2; }

if [[ -n "${MLX_TRANSFORMER_NO_OPTIMUM:-}" ]]; then
  say "MLX_TRANSFORMER_NO_OPTIMUM is set: not installing"
  exit 1
fi

PYTHON="${1:-}"
if [[ -z "$PYTHON" ]]; then
  if command -v python3 >/dev/null; then PYTHON=python3; else PYTHON="$REPO/.venv/bin/python"; fi
fi

# A quick check (importing optimum.onnxruntime takes ~15 s: it loads torch and transformers).
installed() {
  "$VENV/bin/python" -c 'import importlib.util as u, sys
sys.exit(u.find_spec("optimum.onnxruntime") is None)' 2>/dev/null
}

wanted="${REQUIREMENTS[*]}"
if [[ -f "$HOME_DIR/stamp" && "$(cat "$HOME_DIR/stamp")" == "$wanted" ]] && installed; then
  exit 0
fi

# The stamp is written last: a run that was interrupted, or failed, leaves none, and the next run
# starts again from an empty venv instead of trusting a half-built one.
mkdir -p "$HOME_DIR"
rm -rf "$VENV" "$HOME_DIR/stamp"
say "creating $VENV (${REQUIREMENTS[*]}); this takes a few minutes once"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet "${REQUIREMENTS[@]}"
if ! "$VENV/bin/python" -c 'from optimum.onnxruntime import ORTModelForCausalLM'; then
  say "optimum.onnxruntime does not import in $VENV"
  exit 1
fi
printf '%s' "$wanted" >"$HOME_DIR/stamp"
say "done: $VENV"
