"""A fast BLAS for MLX's Linux CPU backend, chosen before MLX loads its own.

The `mlx-cpu` wheel links the reference (Netlib) BLAS it bundles in `mlx_cpu.libs/`: a 1024³ fp32
matmul runs at a few GFLOP/s. An optimized OpenBLAS that exports the same plain symbols
(`cblas_sgemm`, `sgemm_`) and is put in `LD_PRELOAD` wins symbol resolution, so MLX's matmuls run
on it unchanged. `LD_PRELOAD` is only read when a process starts, so `ensure_fast_blas()`
re-executes the current command once with it set; a process that cannot re-execute itself
(pytest) gets the same environment from `python -m mlx_transformer.cpu.blas --print-env`, read by
scripts/test.sh. This module imports no MLX: it must act before MLX loads. Finding and probing
the library is in blas_probe.py.

Environment:
  MLX_TRANSFORMER_BLAS   unset/"auto": find an OpenBLAS; "reference": keep MLX's own BLAS, no
                         notice; a path: preload that library.
  OPENBLAS_NUM_THREADS   left alone when set (as are GOTO_/OMP_NUM_THREADS); otherwise set in the
                         re-executed process to default_threads() (see there).
  OPENBLAS_CORETYPE      left alone when set; otherwise set when the library's CPU detection fell
                         back to its generic x86-64 kernels on a CPU that has AVX2/AVX-512.
  MLX_TRANSFORMER_GEMV   "off": do not preload cpu/gemv.py's cblas_sgemm in front of OpenBLAS
                         (one-row products to sgemv, 2-16 rows streamed; on by default when a C
                         compiler is found).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from pathlib import Path

from . import gemv
from .blas_probe import (
    SETTING_VAR,
    _installed_files,
    _mapped_libraries,
    _site_dirs,
    find_optimized_blas,
    mlx_flavor,
    preloaded_blas,
)

REEXEC_MARKER = "_MLX_TRANSFORMER_BLAS_REEXEC"  # set in the re-executed process: never loop
NOTICE_MARKER = "_MLX_TRANSFORMER_BLAS_NOTICE"  # set once a notice was printed: once per tree
THREADS_MARKER = "_MLX_TRANSFORMER_BLAS_THREADS"  # set when we chose OPENBLAS_NUM_THREADS
FIX_COMMAND = "sudo apt-get install libopenblas0-pthread"
# OpenBLAS threads when the user has not chosen: see default_threads().
MAX_DEFAULT_THREADS = 4


# --------------------------------------------------------------------------- pure helpers


def default_threads(cores: int) -> int:
    """OpenBLAS threads to use when the user has not set OPENBLAS_NUM_THREADS.

    Half the cores, at most 4: MLX runs its other CPU ops on its own thread, and a GEMM split over
    more threads than the scheduler gives it waits for the parked one. On 2 idle cores
    (scripts/profile_generate.py --all-cores) 2 threads made generation 1.05-2x faster, but with
    one other busy process 2 threads made batch-8 decoding 1.9x slower; 1 never collapses.
    """
    return max(1, min(MAX_DEFAULT_THREADS, cores // 2))


def reexec_env(
    env: Mapping[str, str],
    library: str,
    coretype: str | None,
    cores: int = 2,
    forward: str | None = None,
) -> dict[str, str]:
    """The environment of the re-executed process: library preloaded, marker set, threads set.

    `forward`: cpu/gemv.py's library, preloaded first so that its cblas_sgemm wins and passes
    what it does not take to `library`'s.
    """
    new = dict(env)
    preload = (forward, library, env.get("LD_PRELOAD", ""))
    new["LD_PRELOAD"] = " ".join(p for p in preload if p)
    new[REEXEC_MARKER] = library
    if not any(env.get(v) for v in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")):
        new["OPENBLAS_NUM_THREADS"] = str(default_threads(cores))
        new[THREADS_MARKER] = "1"
    if coretype and not env.get("OPENBLAS_CORETYPE"):
        new["OPENBLAS_CORETYPE"] = coretype
    return new


def slow_notice(setting: str = "") -> str:
    """The one line printed when no optimized BLAS can be used."""
    if setting not in ("", "auto", "reference"):
        found = f"{SETTING_VAR}={setting} did not load as a BLAS exporting cblas_sgemm"
    else:
        found = "no optimized BLAS found"
    return (
        f"mlx-transformer: {found}; MLX's CPU matmuls will be slow (about 25x). "
        f"Fix: {FIX_COMMAND}  (or set {SETTING_VAR}=reference to silence this)"
    )


# --------------------------------------------------------------------------- the machine


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (containers, taskset)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextlib.contextmanager
def gemm_bound(env: Mapping[str, str] | None = None, callers: int = 1) -> Iterator[None]:
    """Within the block, OpenBLAS uses every core, shared among `callers` threads that call it
    at once (training's MLX streams): for training, whose GEMMs are big enough.

    The default (`default_threads`) serves generation, where a second thread pays only on an idle
    machine. Measured on 2 idle cores (scripts/bench_train.py, separate processes): 2 threads
    trained 1.2x (4 layers, width 128) and 1.5x (6 layers, width 384) faster than 1 from one
    stream. A thread count the user set (OPENBLAS_NUM_THREADS) is left alone.
    """
    env = os.environ if env is None else env
    try:
        lib = ctypes.CDLL(None)  # the preloaded OpenBLAS is in the global namespace
        get, set_ = lib.openblas_get_num_threads, lib.openblas_set_num_threads
    except (OSError, AttributeError):
        get = set_ = None
    if set_ is None or not env.get(THREADS_MARKER):
        yield
        return
    before = get()
    set_(max(1, cores() // max(1, callers)))
    try:
        yield
    finally:
        set_(before)


def _notify(message: str, env: MutableMapping[str, str]) -> None:
    """Print one line to stderr, once per process tree (children inherit the marker)."""
    if env.get(NOTICE_MARKER):
        return
    print(message, file=sys.stderr, flush=True)
    env[NOTICE_MARKER] = "1"


def ensure_fast_blas(
    env: MutableMapping[str, str] | None = None,
    execve: Callable[[str, list[str], dict[str, str]], None] = os.execve,
) -> str:
    """Make MLX's Linux CPU matmuls use an optimized BLAS: call first thing in `main()`.

    When this process would use the reference BLAS of the `mlx-cpu` wheel and an optimized
    OpenBLAS is on the machine, re-executes the same command with it in `LD_PRELOAD` (this call
    then never returns). Quiet no-op on macOS, CUDA, without MLX, or with MLX_TRANSFORMER_BLAS=
    reference. Prints one line to stderr, once per process tree, when it cannot help.

    Args:
        env: the environment to read and to mark (default: os.environ); for tests.
        execve: the exec function; for tests.

    Returns:
        "skip" (nothing to do), "active" (an optimized BLAS is preloaded), "notice" (none found),
        "failed" (the preloaded library did not load), "too-late" (mlx already imported).
    """
    env = os.environ if env is None else env
    if env.get(SETTING_VAR, "").strip() == "reference" or sys.platform != "linux":
        return "skip"
    if mlx_flavor() != "reference":
        return "skip"
    if preloaded_blas(env.get("LD_PRELOAD", ""), _mapped_libraries()):
        return "active"
    if env.get(REEXEC_MARKER):  # we already re-executed once and it did not take: never loop
        _notify(
            f"mlx-transformer: could not preload {env[REEXEC_MARKER]}; MLX's CPU path will "
            f"be slow (set {SETTING_VAR}=reference to silence this)",
            env,
        )
        return "failed"
    found = find_optimized_blas(env)
    if found is None:
        _notify(slow_notice(env.get(SETTING_VAR, "").strip()), env)
        return "notice"
    probe, coretype = found
    if "mlx" in sys.modules:
        _notify(
            f"mlx-transformer: {probe.path} is available but mlx was imported first; call "
            "mlx_transformer.cpu.blas.ensure_fast_blas() before importing mlx",
            env,
        )
        return "too-late"
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    argv = [sys.executable, *sys.orig_argv[1:]]
    new_env = reexec_env(env, probe.path, coretype, cores(), gemv.forward_library(env))
    execve(sys.executable, argv, new_env)
    return "reexec"  # only reached when a test passes a fake execve


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _global_provider(symbol: str) -> str | None:
    """The library that provides `symbol` in the global scope (preloads come first), if any.

    MLX's own BLAS is loaded privately (RTLD_LOCAL), so it never shows here: a hit means the
    symbol MLX binds to comes from that library.
    """
    try:
        process = ctypes.CDLL(None)
        address = ctypes.cast(getattr(process, symbol), ctypes.c_void_p)
        dladdr = process.dladdr
    except (AttributeError, OSError):
        return None
    info = _DlInfo()
    if not dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(info.dli_fname.decode())


def _openblas_state(path: str) -> dict[str, object]:
    """Config, core and threads of an OpenBLAS that is already loaded (opening it loads nothing)."""
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return {}
    state: dict[str, object] = {}
    for key in ("config", "corename"):
        fn = getattr(lib, f"openblas_get_{key}", None)
        if fn is not None:
            fn.restype = ctypes.c_char_p
            state[key] = fn().decode()
    if hasattr(lib, "openblas_get_num_threads"):
        state["threads"] = int(lib.openblas_get_num_threads())
    return state


def blas_info() -> dict[str, object]:
    """Which BLAS MLX's CPU matmuls use in this process, for reports and benchmarks.

    Returns:
        {"blas": "openblas" | "mkl" | "other" | "reference" | "accelerate" | "none",
         "library": path or None, "config", "corename", "threads" (OpenBLAS only),
         "gemv_forward": cpu/gemv.py's library when it is in front,
         "mlx": mlx_flavor(), and the environment variables that steer it}.
    """
    flavor = mlx_flavor()
    info: dict[str, object] = {"blas": "none", "library": None, "mlx": flavor}
    provider = _global_provider("cblas_sgemm") if sys.platform == "linux" else None
    if provider and Path(provider).name.startswith("gemv_forward"):
        info["gemv_forward"] = provider  # the BLAS is the one behind it
        provider = _global_provider("cblas_sgemv")
    if provider:
        info.update(_openblas_state(provider), library=provider)
        name = Path(provider).name
        is_openblas = str(info.get("config", "")).startswith("OpenBLAS")
        info["blas"] = "openblas" if is_openblas else "mkl" if "mkl" in name else "other"
    elif flavor == "metal":
        info["blas"] = "accelerate"
    elif flavor in ("reference", "cuda"):
        bundled = [
            f for f in _installed_files("mlx-cpu") or [] if Path(f).name.startswith("libblas")
        ]
        info["blas"] = "reference"
        info["library"] = str(Path(_site_dirs()[-1], bundled[0])) if bundled else None
    for var in ("OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "LD_PRELOAD", SETTING_VAR):
        info[var] = os.environ.get(var)
    return info


def blas_summary() -> str:
    """One line for a report header, e.g. `blas: openblas SkylakeX, 1 thread (/usr/lib/...)`."""
    info = blas_info()
    if info["blas"] != "openblas":
        return f"blas: {info['blas']} ({info['library'] or 'n/a'})"
    threads = info.get("threads")
    gemv_note = ", one-row products via sgemv" if info.get("gemv_forward") else ""
    core = info.get("corename", "?")
    return f"blas: openblas {core}, {threads} thread(s){gemv_note} ({info['library']})"


def preload_exports(env: Mapping[str, str] | None = None) -> list[str]:
    """Shell `export` lines giving a new process the BLAS that `ensure_fast_blas` would
    re-execute with; none when there is nothing to do (or nothing to preload)."""
    env = dict(os.environ if env is None else env)
    wanted: list[dict[str, str]] = []
    ensure_fast_blas(env, execve=lambda exe, argv, new_env: wanted.append(new_env))
    if not wanted:
        return []
    return [f"export {k}={shlex.quote(v)}" for k, v in wanted[0].items() if env.get(k) != v]


if __name__ == "__main__":
    if sys.argv[1:] != ["--print-env"]:
        sys.exit("usage: python -m mlx_transformer.cpu.blas --print-env")
    print("\n".join(preload_exports()))
