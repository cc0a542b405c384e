#!/usr/bin/env bash
# Install the JavaScript clients of an export, privately: onnxruntime-web (copied into the folders
# `mlx-transformer web` writes), transformers.js and onnxruntime-node (Node), puppeteer-core and
# Debian's chromium (the web page's test in a headless browser).
#
# npm packages go under $MLX_TRANSFORMER_WEB_HOME (default ~/.cache/mlx-transformer/web)/node_modules,
# pinned below (export/web.py pins the same onnxruntime-web and tokenizers, and installs them
# there itself when missing). Only the npm registry is used: onnxruntime-node's own download of
# CUDA libraries from GitHub is skipped (its npm package holds the CPU binaries). chromium comes from
# Debian with apt-get, only when running as root. Idempotent: a second run only checks.
#
# Usage: scripts/install_web_clients.sh
set -euo pipefail

HOME_DIR="${MLX_TRANSFORMER_WEB_HOME:-$HOME/.cache/mlx-transformer/web}"
PACKAGES=(
  onnxruntime-web@1.30.0
  onnxruntime-node@1.30.0
  @huggingface/transformers@4.3.2
  @huggingface/tokenizers@0.2.0
  puppeteer-core@25.16.0
)
say() { printf 'install_web_clients: %s\n' "$*" >&2; }

command -v npm >/dev/null || { say "npm not found; install Node.js 18+ (Debian: apt-get install nodejs npm)"; exit 1; }
mkdir -p "$HOME_DIR"
installed() {  # every package at its pinned version
  local spec name version
  for spec in "${PACKAGES[@]}"; do
    name="${spec%@*}" version="${spec##*@}"
    grep -q "\"version\": \"$version\"" "$HOME_DIR/node_modules/$name/package.json" 2>/dev/null || return 1
  done
}
if ! installed; then
  say "npm install ${PACKAGES[*]} → $HOME_DIR"
  [[ -f "$HOME_DIR/package.json" ]] || echo '{"name": "mlx-transformer-web", "private": true}' >"$HOME_DIR/package.json"
  (cd "$HOME_DIR" && ONNXRUNTIME_NODE_INSTALL=skip npm install --no-audit --no-fund --loglevel=error \
    "${PACKAGES[@]}")
  installed || { say "npm install finished, but the pinned versions are not all there"; exit 1; }
fi

if ! command -v chromium >/dev/null; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    say "apt-get install chromium"
    apt-get -qq update && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    say "chromium not installed (needs root: apt-get install chromium); the browser tests will skip"
  fi
fi
say "done: $HOME_DIR"
