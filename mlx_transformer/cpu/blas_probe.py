"""Finding an optimized BLAS for blas.ensure_fast_blas(): which MLX build is installed, where an
OpenBLAS may live, and whether a candidate really loads and computes (probed in a subprocess).

Like blas.py, this module imports no MLX: it runs before MLX loads.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

SETTING_VAR = "MLX_TRANSFORMER_BLAS"  # the user's choice: see blas.py's docstring
# Libraries whose name says they are an optimized BLAS exporting the plain symbols.
OPTIMIZED_NAMES = ("libopenblas", "libmkl_rt", "libblis", "libflexiblas")
# OpenBLAS's DYNAMIC_ARCH falls back to these kernels on x86-64 CPUs it does not recognise
# (e.g. newer Xeons in VMs that report a generic model): 3-4x slower than the right ones.
GENERIC_CORES = ("prescott", "katmai", "core2")


@dataclass(frozen=True)
class Probe:
    """What a candidate library reported when loaded in a throwaway subprocess."""

    path: str
    ok: bool
    config: str = ""
    corename: str = ""
    error: str = ""


# --------------------------------------------------------------------------- pure helpers


def mlx_flavor(files_of: Callable[[str], Iterable[str] | None] | None = None) -> str:
    """Which MLX build is installed, read from package metadata (MLX is not imported).

    Args:
        files_of: distribution name -> its file paths, or None when not installed (for tests).

    Returns:
        "absent", "metal" (macOS), "cuda", "reference" (mlx-cpu bundling Netlib BLAS) or "other".
    """
    files_of = files_of or _installed_files
    if files_of("mlx") is None:
        return "absent"
    if sys.platform == "darwin":
        return "metal"
    if any(files_of(f"mlx-cuda-{v}") is not None for v in ("12", "13")) or files_of("mlx-cuda"):
        return "cuda"
    cpu_files = files_of("mlx-cpu")
    if cpu_files is None:
        return "other"  # built from source, or a layout we do not know: leave it alone
    names = (Path(str(f)).name for f in cpu_files)
    return "reference" if any(n.startswith("libblas") for n in names) else "other"


def candidate_paths(
    multiarch: str, prefixes: Iterable[str] = (), ldconfig_text: str = ""
) -> list[str]:
    """Where an optimized OpenBLAS may live, best first (existence is checked later).

    Args:
        multiarch: e.g. "x86_64-linux-gnu" (Debian/Ubuntu library folder name).
        prefixes: environment prefixes (venv, conda) whose `lib/` may hold one.
        ldconfig_text: output of `ldconfig -p`.
    """
    paths = [
        f"/usr/lib/{multiarch}/openblas-pthread/libopenblas.so.0",  # Debian/Ubuntu
        f"/usr/lib/{multiarch}/openblas-openmp/libopenblas.so.0",
        f"/usr/lib/{multiarch}/libopenblas.so.0",
        "/usr/lib64/libopenblasp.so.0",  # Fedora/RHEL: p = pthreads, o = OpenMP
        "/usr/lib64/libopenblaso.so.0",
        "/usr/lib64/libopenblas.so.0",
        "/usr/lib/libopenblas.so.0",  # Arch, Alpine
        "/usr/local/lib/libopenblas.so.0",
    ]
    for prefix in prefixes:
        paths.append(f"{prefix}/lib/libopenblas.so.0")  # conda
    for line in ldconfig_text.splitlines():
        name, _, path = line.strip().partition(" => ")
        if name.startswith("libopenblas") and path:
            paths.append(path.strip())
    return list(dict.fromkeys(paths))


def wheel_paths(site_dirs: Iterable[str]) -> list[str]:
    """OpenBLAS copies from PyPI wheels that export the plain symbols (checked with `nm -D`).

    cmeel-openblas does (it needs the system's libgfortran5). numpy's and scipy-openblas32/64's
    copies prefix every symbol (`scipy_cblas_sgemm`), so they cannot stand in for MLX's BLAS.
    """
    return [f"{d}/cmeel.prefix/lib/libopenblas.so.0" for d in site_dirs]


def preloaded_blas(ld_preload: str, mapped: Iterable[str] = ()) -> str | None:
    """The optimized BLAS already in `LD_PRELOAD` (and, when known, really mapped), else None."""
    mapped = set(mapped)
    for entry in ld_preload.replace(":", " ").split():
        if Path(entry).name.startswith(OPTIMIZED_NAMES):
            if not mapped or entry in mapped or os.path.realpath(entry) in mapped:
                return entry
    return None


def coretype_for(probe: Probe, cpu_flags: set[str], machine: str) -> str | None:
    """The OPENBLAS_CORETYPE to force, or None to trust the library's own detection."""
    if machine not in ("x86_64", "AMD64") or "DYNAMIC_ARCH" not in probe.config:
        return None
    if probe.corename.lower() not in GENERIC_CORES:
        return None
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= cpu_flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= cpu_flags:
        return "Haswell"
    if "avx" in cpu_flags:
        return "Sandybridge"
    return None


# --------------------------------------------------------------------------- the machine


def _installed_files(dist: str) -> list[str] | None:
    """The RECORD of an installed distribution, or None (importlib.metadata costs ~60 ms)."""
    pattern = f"{dist.replace('-', '_')}-*.dist-info"
    for entry in sys.path:
        for info in Path(entry or ".").glob(pattern) if os.path.isdir(entry or ".") else ():
            try:
                text = (info / "RECORD").read_text()
            except OSError:
                return []
            return [line.split(",")[0] for line in text.splitlines()]
    return None


def _multiarch() -> str:
    return sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"


def _ldconfig_text() -> str:
    for exe in ("ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        try:
            return subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            continue
    return ""


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _mapped_libraries() -> set[str]:
    """Paths of the shared libraries loaded in this process."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    return {f[-1] for f in (ln.split() for ln in lines) if len(f) >= 6 and ".so" in f[-1]}


_PROBE_CODE = """
import ctypes, json, sys
out = {}
try:
    lib = ctypes.CDLL(sys.argv[1])
    lib.cblas_sgemm, lib.sgemm_  # the plain symbols MLX binds to; AttributeError if prefixed
    n = 64  # ones @ ones = n everywhere; exercises the real GEMM kernel
    a = (ctypes.c_float * (n * n))(*([1.0] * (n * n)))
    c = (ctypes.c_float * (n * n))()
    f = ctypes.c_float
    lib.cblas_sgemm(101, 111, 111, n, n, n, f(1.0), a, n, a, n, f(0.0), c, n)
    out["ok"] = all(x == n for x in c)
    for key in ("config", "corename"):
        fn = getattr(lib, "openblas_get_" + key, None)
        if fn is not None:
            fn.restype = ctypes.c_char_p
            out[key] = fn().decode()
except Exception as e:
    out.update(ok=False, error=f"{type(e).__name__}: {e}")
print(json.dumps(out))
"""


def probe_library(path: str, env: Mapping[str, str] | None = None) -> Probe:
    """Load `path` in a subprocess and run a small sgemm on it; a crash there cannot hurt us."""
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _PROBE_CODE, path],
            capture_output=True,
            text=True,
            timeout=20,
            env=dict(env if env is not None else os.environ),
        )
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return Probe(path, ok=False, error="probe process failed")
    return Probe(
        path,
        ok=bool(data.get("ok")),
        config=data.get("config", ""),
        corename=data.get("corename", ""),
        error=data.get("error", ""),
    )


def _site_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def _candidates(env: Mapping[str, str]) -> Iterable[str]:
    """Existing candidate libraries, best first; lazy, so `ldconfig -p` runs only when needed."""
    setting = env.get(SETTING_VAR, "").strip()
    if setting not in ("", "auto", "reference"):
        yield setting  # a path given by the user
        return
    prefixes = [p for p in (sys.prefix, env.get("CONDA_PREFIX")) if p]
    yield from (p for p in candidate_paths(_multiarch(), prefixes) if os.path.exists(p))
    yield from (p for p in wheel_paths(_site_dirs()) if os.path.exists(p))
    yield from (p for p in candidate_paths(_multiarch(), (), _ldconfig_text()) if os.path.exists(p))


def find_optimized_blas(env: Mapping[str, str] | None = None) -> tuple[Probe, str | None] | None:
    """The first optimized BLAS that loads and computes correctly, and the coretype to force.

    Returns:
        (probe, coretype) — coretype is None when the library's own CPU detection is fine — or
        None when there is no usable library on this machine.
    """
    env = os.environ if env is None else env
    seen = set()
    for path in _candidates(env):
        if path in seen:
            continue
        seen.add(path)
        probe = probe_library(path, env)
        if not probe.ok:
            continue
        coretype = None
        if not env.get("OPENBLAS_CORETYPE"):
            coretype = coretype_for(probe, _cpu_flags(), platform.machine())
        if coretype and not probe_library(path, {**env, "OPENBLAS_CORETYPE": coretype}).ok:
            coretype = None  # the forced kernels did not run here: trust the library after all
        return probe, coretype
    return None
