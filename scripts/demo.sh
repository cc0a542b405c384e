#!/usr/bin/env bash
# The README's main command: set up, then run the whole journey on the embedded Tiny Shakespeare.
#   scripts/demo.sh [mlx-transformer demo arguments...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh --no-test-deps
exec "${VIRTUAL_ENV:-.venv}/bin/mlx-transformer" demo "$@"
