"""mlx_transformer.cpu.blas, blas_probe: finding an optimized BLAS, re-executing with it preloaded.

Pure helpers are tested with fake paths and environments; `ensure_fast_blas` with a fake execve;
and, when OpenBLAS is installed here, one real re-executed subprocess and one pytest run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlx_transformer.cpu import blas, blas_probe

ROOT = Path(__file__).resolve().parents[1]
AVX512 = {"avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}
DYNAMIC = "OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH NO_AFFINITY Prescott MAX_THREADS=64"


def fake_dists(**dists: list[str]):
    """files_of() over a fake set of installed distributions (name -> RECORD paths)."""
    return lambda name: dists.get(name.replace("-", "_"))


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "dists, expected",
    [
        ({}, "absent"),
        ({"mlx": [], "mlx_cpu": ["mlx_cpu.libs/libblas-bd8a282c.so.3.10.0"]}, "reference"),
        ({"mlx": [], "mlx_cpu": ["mlx_cpu.libs/libopenblas-1234.so"]}, "other"),
        ({"mlx": [], "mlx_cuda_13": [], "mlx_cpu": ["mlx_cpu.libs/libblas.so"]}, "cuda"),
        ({"mlx": []}, "other"),  # built from source: leave it alone
    ],
)
def test_mlx_flavor_from_installed_files(monkeypatch, dists, expected):
    monkeypatch.setattr(sys, "platform", "linux")
    assert blas_probe.mlx_flavor(fake_dists(**dists)) == expected


def test_mlx_flavor_on_macos_is_metal(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert blas_probe.mlx_flavor(fake_dists(mlx=[])) == "metal"


def test_installed_files_reads_a_dist_info_record(monkeypatch, tmp_path):
    info = tmp_path / "mlx_cpu-0.32.4.dist-info"
    info.mkdir()
    (info / "RECORD").write_text("mlx_cpu.libs/libblas-x.so.3,sha256=abc,10\nmlx/lib/libmlx.so,,\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    assert blas_probe._installed_files("mlx-cpu") == [
        "mlx_cpu.libs/libblas-x.so.3",
        "mlx/lib/libmlx.so",
    ]
    assert blas_probe._installed_files("mlx-cuda-13") is None


def test_candidate_paths_debian_first_then_ldconfig_without_duplicates():
    ldconfig = textwrap.dedent("""\
        3 libs found in cache `/etc/ld.so.cache'
            libopenblas.so.0 (libc6,x86-64) => /lib/x86_64-linux-gnu/libopenblas.so.0
            libblas.so.3 (libc6,x86-64) => /lib/x86_64-linux-gnu/libblas.so.3
            libopenblas.so.0 (libc6,x86-64) => /usr/lib64/libopenblas.so.0
        """)
    paths = blas_probe.candidate_paths("aarch64-linux-gnu", ["/opt/conda"], ldconfig)
    assert paths[0] == "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0"
    assert "/opt/conda/lib/libopenblas.so.0" in paths
    assert "/lib/x86_64-linux-gnu/libopenblas.so.0" in paths
    assert "/lib/x86_64-linux-gnu/libblas.so.3" not in paths  # may be the reference BLAS
    assert len(paths) == len(set(paths))


def test_preloaded_blas_needs_an_optimized_name_that_is_really_mapped():
    lib = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
    assert blas_probe.preloaded_blas(f"/x/libjemalloc.so.2 {lib}") == lib
    assert blas_probe.preloaded_blas(f"/x/libjemalloc.so.2:{lib}", mapped={lib}) == lib
    assert blas_probe.preloaded_blas(lib, mapped={"/x/libjemalloc.so.2"}) is None  # failed to load
    assert blas_probe.preloaded_blas("/x/libjemalloc.so.2") is None
    assert blas_probe.preloaded_blas("") is None


@pytest.mark.parametrize(
    "config, corename, flags, expected",
    [
        (DYNAMIC, "Prescott", AVX512, "SkylakeX"),  # unknown CPU in a VM: generic kernels
        (DYNAMIC, "Prescott", {"avx", "avx2", "fma"}, "Haswell"),
        (DYNAMIC, "Prescott", {"sse2"}, None),  # really an old CPU: keep its choice
        (DYNAMIC, "Haswell", AVX512, None),  # detection worked: trust it
        ("OpenBLAS 0.3.31 NO_AFFINITY SKYLAKEX", "Prescott", AVX512, None),  # not DYNAMIC_ARCH
    ],
)
def test_coretype_is_forced_only_when_detection_fell_back(config, corename, flags, expected):
    probe = blas_probe.Probe("/x/libopenblas.so.0", ok=True, config=config, corename=corename)
    assert blas_probe.coretype_for(probe, flags, "x86_64") == expected
    assert blas_probe.coretype_for(probe, flags, "aarch64") is None


def test_default_threads_leaves_a_core_for_mlx():
    assert [blas.default_threads(n) for n in (1, 2, 3, 4, 8, 64)] == [1, 1, 1, 2, 4, 4]


def test_reexec_env_prepends_preload_marks_and_respects_user_settings():
    lib = "/usr/lib/libopenblas.so.0"
    env = blas.reexec_env({"LD_PRELOAD": "/x/libjemalloc.so.2", "HOME": "/h"}, lib, "SkylakeX", 8)
    assert env["LD_PRELOAD"] == f"{lib} /x/libjemalloc.so.2"
    assert env[blas.REEXEC_MARKER] == lib
    assert env["OPENBLAS_NUM_THREADS"] == "4" and env["OPENBLAS_CORETYPE"] == "SkylakeX"
    assert env["HOME"] == "/h"
    forward = "/c/gemv_forward-0.so"  # preloaded first: its cblas_sgemm passes the rest to lib
    env = blas.reexec_env({"LD_PRELOAD": "/x/libjemalloc.so.2"}, lib, None, 8, forward)
    assert env["LD_PRELOAD"] == f"{forward} {lib} /x/libjemalloc.so.2"
    assert env[blas.REEXEC_MARKER] == lib
    user = {"OMP_NUM_THREADS": "3", "OPENBLAS_CORETYPE": "Haswell"}
    env = blas.reexec_env(user, lib, "SkylakeX", 8)
    assert env["LD_PRELOAD"] == lib
    assert "OPENBLAS_NUM_THREADS" not in env and env["OPENBLAS_CORETYPE"] == "Haswell"


def test_probe_of_a_file_that_is_not_a_library_fails_cleanly(tmp_path):
    fake = tmp_path / "libopenblas.so.0"
    fake.write_text("not an ELF file")
    probe = blas_probe.probe_library(str(fake))
    assert not probe.ok and "OSError" in probe.error


# --------------------------------------------------------------------------- ensure_fast_blas


@pytest.fixture
def linux_reference(monkeypatch):
    """A Linux process about to use the reference BLAS, mlx not imported."""
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(blas, "mlx_flavor", lambda: "reference")
    monkeypatch.setattr(blas, "_mapped_libraries", set)
    monkeypatch.delitem(sys.modules, "mlx", raising=False)
    probe = blas_probe.Probe(
        "/usr/lib/libopenblas.so.0", ok=True, config=DYNAMIC, corename="Haswell"
    )
    monkeypatch.setattr(blas, "find_optimized_blas", lambda env: (probe, None))
    monkeypatch.setattr(blas.gemv, "forward_library", lambda env: None)  # tests/test_gemv.py
    calls: list[tuple] = []
    return lambda *args: calls.append(args), calls


def test_reexecs_with_the_library_preloaded(linux_reference):
    execve, calls = linux_reference
    assert blas.ensure_fast_blas({"PATH": "/bin"}, execve=execve) == "reexec"
    [(exe, argv, env)] = calls
    assert exe == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
    assert env["LD_PRELOAD"] == "/usr/lib/libopenblas.so.0" and env[blas.REEXEC_MARKER]


def test_opt_out_keeps_the_reference_blas_silently(linux_reference, capsys):
    execve, calls = linux_reference
    assert blas.ensure_fast_blas({blas.SETTING_VAR: "reference"}, execve=execve) == "skip"
    assert calls == [] and capsys.readouterr().err == ""


def test_quiet_no_op_on_macos_and_without_mlx(linux_reference, monkeypatch, capsys):
    execve, calls = linux_reference
    monkeypatch.setattr(blas, "mlx_flavor", lambda: "absent")
    assert blas.ensure_fast_blas({}, execve=execve) == "skip"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert blas.ensure_fast_blas({}, execve=execve) == "skip"
    assert calls == [] and capsys.readouterr().err == ""


def test_already_preloaded_is_left_alone(linux_reference, monkeypatch):
    execve, calls = linux_reference
    lib = "/usr/lib/libopenblas.so.0"
    monkeypatch.setattr(blas, "_mapped_libraries", lambda: {lib})
    assert blas.ensure_fast_blas({"LD_PRELOAD": lib}, execve=execve) == "active"
    assert calls == []


def test_marker_prevents_a_second_reexec_and_warns_once(linux_reference, capsys):
    execve, calls = linux_reference
    env = {blas.REEXEC_MARKER: "/usr/lib/libopenblas.so.0", "LD_PRELOAD": "/usr/lib/x.so"}
    assert blas.ensure_fast_blas(env, execve=execve) == "failed"
    assert blas.ensure_fast_blas(env, execve=execve) == "failed"
    assert calls == []
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_notice_when_none_found_is_printed_once_per_process_tree(
    linux_reference, monkeypatch, capsys
):
    execve, calls = linux_reference
    monkeypatch.setattr(blas, "find_optimized_blas", lambda env: None)
    env: dict[str, str] = {}
    assert blas.ensure_fast_blas(env, execve=execve) == "notice"
    assert blas.ensure_fast_blas(env, execve=execve) == "notice"
    [line] = capsys.readouterr().err.splitlines()
    assert blas.FIX_COMMAND in line
    child_env = dict(env)  # a child process inherits the marker: stays quiet
    assert blas.ensure_fast_blas(child_env, execve=execve) == "notice"
    assert capsys.readouterr().err == "" and calls == []


def test_never_reexecs_once_mlx_is_imported(linux_reference, monkeypatch, capsys):
    execve, calls = linux_reference
    monkeypatch.setitem(sys.modules, "mlx", object())
    assert blas.ensure_fast_blas({}, execve=execve) == "too-late"
    assert calls == [] and "before importing mlx" in capsys.readouterr().err


# --------------------------------------------------------------------------- the real thing

FOUND = blas.find_optimized_blas() if blas.mlx_flavor() == "reference" else None
needs_openblas = pytest.mark.skipif(
    FOUND is None,
    reason="needs the mlx-cpu wheel and an optimized OpenBLAS (sudo apt-get install "
    "libopenblas0-pthread)",
)


def clean_env() -> dict[str, str]:
    drop = ("LD_PRELOAD", "OPENBLAS_", "_MLX_TRANSFORMER", blas.SETTING_VAR)
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


CHILD = """
import json, sys
from mlx_transformer.cpu.blas import ensure_fast_blas, blas_info
ensure_fast_blas()
import mlx.core as mx
import numpy as np
rng = np.random.default_rng(0)
a, b = rng.standard_normal((2, 384, 384)).astype(np.float32)
got = np.array(mx.array(a) @ mx.array(b))
want = a.astype(np.float64) @ b.astype(np.float64)
print(json.dumps({"err": float(np.abs(got - want).max()), "info": blas_info()}))
"""


@needs_openblas
def test_reexec_runs_mlx_matmuls_on_openblas_with_the_same_results():
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    info = out["info"]
    assert info["blas"] == "openblas", info
    assert info["library"] == os.path.realpath(FOUND[0].path)
    assert info["threads"] == blas.default_threads(blas.cores())
    assert out["err"] < 1e-3  # fp32 accumulation over 384 terms of size ~1: ~1e-5 expected
    assert proc.stderr == ""  # no notice when it worked


def test_print_env_gives_the_reexec_environment_as_shell_exports(linux_reference):
    """What scripts/test.sh evaluates before pytest: the re-exec's changes, shell-quoted."""
    env = {"PATH": "/bin", "LD_PRELOAD": "/x/lib jemalloc.so"}
    lines = blas.preload_exports(env)
    assert "export LD_PRELOAD='/usr/lib/libopenblas.so.0 /x/lib jemalloc.so'" in lines
    assert f"export {blas.REEXEC_MARKER}=/usr/lib/libopenblas.so.0" in lines
    assert not any(line.startswith("export PATH=") for line in lines)  # unchanged: not exported


@needs_openblas
def test_print_env_then_pytest_runs_mlx_on_openblas(tmp_path):
    """The test command's way: a shell evaluates `--print-env`, then starts pytest, whose MLX
    matmuls then run on the preloaded OpenBLAS (no re-execution inside pytest)."""
    (tmp_path / "test_x.py").write_text(
        "import mlx.core as mx\nfrom mlx_transformer.cpu.blas import blas_info\n"
        "def test_x():\n    mx.eval(mx.ones((8, 8)) @ mx.ones((8, 8)))\n"
        "    assert blas_info()['blas'] == 'openblas'\n"
    )
    script = (
        f'eval "$({sys.executable} -m mlx_transformer.cpu.blas --print-env)" && '
        f"{sys.executable} -m pytest -q -p no:cacheprovider {tmp_path}"
    )
    proc = subprocess.run(
        ["bash", "-c", script],
        env=clean_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout


def test_gemm_bound_uses_every_core_then_restores():
    """Training's threads: all cores inside the block, the decode default after it."""
    import ctypes

    from mlx_transformer.cpu import blas as blas_mod

    try:
        lib = ctypes.CDLL(None)
        get = lib.openblas_get_num_threads
    except AttributeError:
        pytest.skip("no OpenBLAS preloaded in this test session")
    before = get()
    with blas_mod.gemm_bound(env={blas_mod.THREADS_MARKER: "1"}):
        assert get() == blas_mod.cores()
    assert get() == before
    # Streams calling BLAS at once share the cores (and each gets at least one thread).
    with blas_mod.gemm_bound(env={blas_mod.THREADS_MARKER: "1"}, callers=2):
        assert get() == max(1, blas_mod.cores() // 2)
    with blas_mod.gemm_bound(env={blas_mod.THREADS_MARKER: "1"}, callers=64):
        assert get() == 1
    assert get() == before
    with blas_mod.gemm_bound(env={}):  # the user chose OPENBLAS_NUM_THREADS: left alone
        assert get() == before
