#!/usr/bin/env bash
# The README's test command: set up (venv, package with test extras, fast BLAS), then run pytest.
#   scripts/test.sh [pytest arguments...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
exec "${VIRTUAL_ENV:-.venv}/bin/python" -m pytest "$@"
