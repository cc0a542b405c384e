#!/usr/bin/env bash
# The README's test command: set up (venv, package with test extras, fast BLAS), then run pytest.
#   scripts/test.sh [pytest arguments...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
# onnxruntime's WebGPU provider on a software Vulkan GPU, so verify runs on a GPU provider too.
# Private folder, cached between runs; if it cannot be installed the WebGPU tests skip, saying why.
if [[ "$(uname -s)-$(uname -m)" == Linux-x86_64 && -z "${MLX_TRANSFORMER_NO_WEBGPU:-}" ]]; then
  scripts/install_webgpu_ep.sh "${VIRTUAL_ENV:-.venv}/bin/python" ||
    echo "test: WebGPU provider not installed; its tests will be skipped" >&2
fi
scripts/install_web_clients.sh || echo "test: web clients not installed; their tests will be skipped" >&2
scripts/install_optimum.sh || echo "test: optimum not installed; its tests will be skipped" >&2
py="${VIRTUAL_ENV:-.venv}/bin/python"
# MLX's Linux CPU matmuls on an optimized OpenBLAS: the command line re-executes itself with it
# preloaded; pytest cannot, so the preload is set here, before pytest starts.
eval "$("$py" -m mlx_transformer.cpu.blas --print-env)"
exec "$py" -m pytest "$@"
