#!/usr/bin/env bash
# Install onnxruntime's WebGPU plugin EP with a software Vulkan GPU (Mesa lavapipe), privately.
#
# Everything goes under $MLX_TRANSFORMER_WEBGPU_HOME (default ~/.cache/mlx-transformer/webgpu);
# nothing is installed system-wide (no dpkg, no sudo). Idempotent: a second run only checks.
#
#   site/        the onnxruntime-ep-webgpu package (pip --target)
#   apt/         a private apt state for Debian bookworm + bookworm-backports
#   root/        Mesa 25 lavapipe, the Vulkan loader and newer libdrm, unpacked with dpkg-deb -x
#   lvp_icd.json the Vulkan ICD manifest pointing at root/.../libvulkan_lvp.so
#   env.json     read by export/webgpu_plugin.py (which loads these and the package by path)
#   env.sh       for shells: `. ~/.cache/mlx-transformer/webgpu/env.sh`
#
# Why: Debian 12's Mesa 22.3 is rejected by Dawn ("No supported adapters"); Mesa 25 from
# bookworm-backports works (measured on Debian 12, Nov 2026).
#
# Usage: scripts/install_webgpu_ep.sh [PYTHON]   (default: .venv/bin/python, else python3)
set -euo pipefail

HOME_DIR="${MLX_TRANSFORMER_WEBGPU_HOME:-$HOME/.cache/mlx-transformer/webgpu}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${1:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
ARCH_LIB=x86_64-linux-gnu
LIB_DIR="$HOME_DIR/root/usr/lib/$ARCH_LIB"
ICD="$HOME_DIR/lvp_icd.json"
say() { printf 'install_webgpu_ep: %s\n' "$*" >&2; }

if [[ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]] || ! command -v apt-get >/dev/null; then
  say "this script is for Debian/Ubuntu x86_64; elsewhere: pip install onnxruntime-ep-webgpu"
  exit 1
fi
mkdir -p "$HOME_DIR"/{site,debs,root} "$HOME_DIR"/apt/{state/lists/partial,cache/archives/partial}

# 1. The plugin package (it does not depend on onnxruntime; the venv's onnxruntime loads it).
if [[ ! -d "$HOME_DIR/site/onnxruntime_ep_webgpu" ]]; then
  say "pip install onnxruntime-ep-webgpu → $HOME_DIR/site"
  "$PYTHON" -m pip install --quiet --no-deps --target "$HOME_DIR/site" onnxruntime-ep-webgpu
fi

# 2. Mesa lavapipe from bookworm-backports, with the libraries this system lacks.
if [[ ! -f "$LIB_DIR/libvulkan_lvp.so" ]]; then
  cat >"$HOME_DIR/apt/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-backports main
EOF
  APT=(-o "Dir::State=$HOME_DIR/apt/state" -o "Dir::Cache=$HOME_DIR/apt/cache"
    -o "Dir::Etc::SourceList=$HOME_DIR/apt/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::status=/var/lib/dpkg/status" -o "Debug::NoLocking=1"
    -o "APT::Sandbox::User=root")
  say "apt-get update (private state)"
  apt-get "${APT[@]}" -qq update
  mesa="$(apt-cache "${APT[@]}" policy mesa-vulkan-drivers | awk '/~bpo/ {print $1; exit}')"
  [[ -n "$mesa" ]] || { say "no backported mesa-vulkan-drivers found"; exit 1; }
  packages=("mesa-vulkan-drivers=$mesa")
  # Dependencies: missing ones, and libdrm (Mesa 25 needs >= 2.4.121, bookworm has 2.4.114).
  deps="$(apt-cache "${APT[@]}" show "mesa-vulkan-drivers=$mesa" | sed -n 's/^Depends: //p' \
    | tr ',' '\n' | sed 's/(.*//; s/|.*//; s/ //g')"
  for dep in $deps; do
    if [[ "$dep" == libdrm* ]]; then
      packages+=("$dep/bookworm-backports")
    elif ! dpkg-query -W -f='${Status}' "$dep" 2>/dev/null | grep -q "install ok installed"; then
      packages+=("$dep")
    fi
  done
  say "downloading ${packages[*]}"
  (cd "$HOME_DIR/debs" && apt-get "${APT[@]}" -qq download "${packages[@]}")
  for deb in "$HOME_DIR"/debs/*.deb; do dpkg-deb -x "$deb" "$HOME_DIR/root"; done
fi
[[ -f "$LIB_DIR/libvulkan_lvp.so" ]] || { say "lavapipe missing after unpacking"; exit 1; }

# 3. Manifests for the Vulkan loader, for export/webgpu_plugin.py and for shells.
cat >"$ICD" <<EOF
{"ICD": {"api_version": "1.3.0", "library_path": "$LIB_DIR/libvulkan_lvp.so"},
 "file_format_version": "1.0.0"}
EOF
cat >"$HOME_DIR/env.json" <<EOF
{"VK_ICD_FILENAMES": "$ICD", "lib_dir": "$LIB_DIR", "site_dir": "$HOME_DIR/site"}
EOF
cat >"$HOME_DIR/env.sh" <<EOF
export VK_ICD_FILENAMES="$ICD"
export LD_LIBRARY_PATH="$LIB_DIR\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export PYTHONPATH="$HOME_DIR/site\${PYTHONPATH:+:\$PYTHONPATH}"
export ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER=1
EOF

# 4. Smoke test: can onnxruntime see a WebGPU device?
if (cd "$REPO" && PYTHONPATH="$REPO" "$PYTHON" -c '
from export import providers
import sys
ok = "WebGpuExecutionProvider" in providers.available()
print("WebGPU EP:", "available" if ok else "registered, but no device")
sys.exit(0 if ok else 1)
'); then
  say "done: $HOME_DIR"
else
  say "installed under $HOME_DIR, but onnxruntime sees no WebGPU device"
  exit 1
fi
