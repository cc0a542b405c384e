"""Batch-1 decoding's matmuls at gemv speed: builds the `gemv_forward.c` preload.

MLX computes a (1, K) x (K, N) product with `cblas_sgemm`. OpenBLAS before 0.3.27 (Debian and
Ubuntu ship 0.3.21-0.3.26) packs the whole (K, N) matrix for it, and ran 2.5-5x slower than its
own `cblas_sgemv` on the decode shapes measured (scripts/bench_blas.py: t1-gemv), and batched
decoding's 2-16 rows fare no better. The C file is a `cblas_sgemm` that sends products with one
output row or column to `cblas_sgemv`, streams the weight once for 2-16 rows, and passes the
rest through; cpu/blas.py preloads it in front of OpenBLAS. Built once per source version with
the C compiler MLX's CPU backend already needs for `mx.compile`, into the user's cache folder.
No compiler, or MLX_TRANSFORMER_GEMV=off: OpenBLAS alone, as before. This module imports no MLX.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from ..atomic import write_bytes

SOURCE = Path(__file__).with_name("gemv_forward.c")
SETTING = "MLX_TRANSFORMER_GEMV"  # "off": no forwarding


def cache_dir(env: Mapping[str, str]) -> Path:
    home = env.get("HOME") or tempfile.gettempdir()
    return Path(env.get("XDG_CACHE_HOME") or Path(home, ".cache")) / "mlx-transformer"


def forward_library(env: Mapping[str, str] | None = None) -> str | None:
    """Path of the built preload, building it when missing; None when off or it cannot be built."""
    env = os.environ if env is None else env
    if env.get(SETTING, "").strip().lower() in ("off", "0", "no"):
        return None
    source = SOURCE.read_bytes()
    target = cache_dir(env) / f"gemv_forward-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if target.is_file():
        return str(target)
    compilers = (env.get("CC"), "cc", "gcc", "clang")
    compiler = next((c for c in compilers if c and shutil.which(c, path=env.get("PATH"))), None)
    if compiler is None:
        return None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            built = Path(tmp) / target.name
            cmd = [compiler, "-O2", "-shared", "-fPIC", "-o", str(built), str(SOURCE), "-ldl"]
            path = {"PATH": env.get("PATH", os.defpath)}
            subprocess.run(cmd, check=True, capture_output=True, timeout=120, env=path)
            write_bytes(target, built.read_bytes())  # never half a library where one is loaded
    except (OSError, subprocess.SubprocessError):
        return None
    return str(target)
