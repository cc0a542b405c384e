#!/usr/bin/env bash
# Set up mlx-transformer for development: a virtual environment, the package, a fast BLAS.
#
#   scripts/setup.sh [--no-test-deps] [--no-blas]
#
# - Environment: if a virtual environment is active ($VIRTUAL_ENV), installs into it (you chose
#   it); otherwise creates ./.venv with the system python3 (>= 3.10) when absent, and uses it.
# - Installs the package editable with its test extra (`pip install -e '.[test]'`; torch and
#   transformers are big: --no-test-deps installs only `-e .`). Pip runs again only when
#   pyproject.toml, the options or the Python changed (a stamp in the environment), so a second
#   run takes about a second.
# - Linux: MLX's CPU wheel ships the slow reference BLAS; mlx_transformer.cpu.blas swaps in an
#   optimized OpenBLAS when one is installed. When none is, installs Debian/Ubuntu's
#   libopenblas0-pthread with apt-get if we are root or have passwordless sudo, else prints the
#   command to run. --no-blas skips this step. macOS needs nothing (Accelerate).
# Works unattended (CI=true, no stdin). Safe to run again.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { printf 'setup: %s\n' "$*"; }

test_deps=1
blas=1
for arg in "$@"; do
  case "$arg" in
    --no-test-deps) test_deps=0 ;;
    --no-blas) blas=0 ;;
    -h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

# 1. The virtual environment.
if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  venv="$VIRTUAL_ENV"
  say "using the active virtual environment $venv"
else
  venv=.venv
  if [[ ! -x "$venv/bin/python" ]]; then
    command -v python3 >/dev/null || { echo "setup: python3 not found; install Python >= 3.10" >&2; exit 1; }
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
      || { echo "setup: $(python3 --version) is too old; need Python >= 3.10" >&2; exit 1; }
    say "creating $venv with $(python3 --version)"
    python3 -m venv "$venv"
  else
    say "using $venv"
  fi
fi
py="$venv/bin/python"

# 2. The package. The stamp keys on what decides pip's work.
extras=$([[ $test_deps == 1 ]] && echo "[test]" || echo "")
stamp="$venv/.mlx-transformer-setup"
key=$("$py" - "$extras" <<'EOF'
import hashlib, sys
print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest(), sys.argv[1], sys.version)
EOF
)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$key" ]] && "$py" -c 'import mlx_transformer' 2>/dev/null; then
  say "packages up to date (pyproject.toml unchanged): skipping pip"
else
  quiet=$([[ "${CI:-}" == "true" ]] && echo "-q" || echo "")
  say "upgrading pip"
  "$py" -m pip install $quiet --upgrade pip
  say "pip install -e '.$extras'"
  "$py" -m pip install $quiet -e ".$extras"
  printf '%s\n' "$key" > "$stamp"
fi

# 3. A fast BLAS for MLX's CPU backend (Linux only).
has_fast_blas() {
  "$py" -c 'import sys; from mlx_transformer.cpu.blas import find_optimized_blas as f; sys.exit(f() is None)'
}
if [[ "$(uname -s)" != "Linux" ]]; then
  say "not Linux: MLX uses Apple's Accelerate, no BLAS to install"
elif [[ $blas == 0 ]]; then
  say "--no-blas: leaving the BLAS alone"
elif has_fast_blas; then
  say "an optimized OpenBLAS is installed"
else
  sudo=""
  [[ $(id -u) == 0 ]] || { sudo -n true 2>/dev/null && sudo="sudo -n"; } || sudo="no"
  if [[ "$sudo" == "no" ]] || ! command -v apt-get >/dev/null; then
    say "no optimized BLAS: MLX's CPU path will be slow. Fix: sudo apt-get install libopenblas0-pthread"
  else
    say "installing libopenblas0-pthread with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q libopenblas0-pthread \
      || { $sudo apt-get update -q && $sudo apt-get install -y -q libopenblas0-pthread; }
  fi
fi

say "done. BLAS for MLX's CPU matmuls:"
"$py" -c 'from mlx_transformer.cpu.blas import ensure_fast_blas as e, blas_summary as s; e(); print("  " + s())'
