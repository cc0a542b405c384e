"""The private WebGPU install made by scripts/install_webgpu_ep.sh, loaded by path.

Why this exists: Dawn, inside onnxruntime's WebGPU plugin EP, finds no adapter on Debian 12's
Mesa 22.3; the lavapipe (software Vulkan) of Mesa 25 works. So the install script puts the
plugin EP package and Mesa 25 lavapipe (with the Vulkan loader and the newer libdrm it needs)
under WEBGPU_HOME, without touching the system, and describes them in env.json. A running
process cannot change its LD_LIBRARY_PATH, and this module leaves sys.path alone, so both the
libraries and the plugin package are loaded here by path. Nothing happens without env.json.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import json
import os
from pathlib import Path

WEBGPU_HOME = Path(
    os.environ.get("MLX_TRANSFORMER_WEBGPU_HOME", Path.home() / ".cache/mlx-transformer/webgpu")
)
PACKAGE = "onnxruntime_ep_webgpu"


def setup() -> Path | None:
    """Point Vulkan at the private Mesa and load its libraries; the private package folder.

    None when there is no private install. Called again, it only reloads what is loaded.
    """
    env_file = WEBGPU_HOME / "env.json"
    if not env_file.is_file():
        return None
    env = json.loads(env_file.read_text())
    os.environ.setdefault("VK_ICD_FILENAMES", env["VK_ICD_FILENAMES"])
    os.environ.setdefault("ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER", "1")
    _preload(env["lib_dir"])
    return Path(env["site_dir"]) / PACKAGE


def _preload(lib_dir: str) -> None:
    """Load the Vulkan loader and libdrm ("lib*.so.N") globally, so that later dlopen()s find
    them by soname. Drivers and layers ("*.so") are left to the loader: loaded globally they
    clash. Their order is unknown, so retry until a round loads nothing more."""
    pending = sorted(glob.glob(os.path.join(lib_dir, "lib*.so.[0-9]")))
    while pending:
        failed = []
        for lib in pending:
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                failed.append(lib)
        if len(failed) == len(pending):
            break
        pending = failed


def library_path(package_dir: Path) -> str | None:
    """The EP library of the plugin package in package_dir, as the package itself reports it."""
    init = package_dir / "__init__.py"
    if not init.is_file():
        return None
    spec = importlib.util.spec_from_file_location(
        PACKAGE, init, submodule_search_locations=[str(package_dir)]
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_library_path()
