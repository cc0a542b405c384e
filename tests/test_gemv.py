"""cpu/gemv.py and gemv_forward.c: one-row/one-column products sent to sgemv, a few rows against a
transposed weight streamed once, the rest untouched.

The library is built for real with the machine's C compiler and preloaded in front of the real
OpenBLAS in a subprocess (as `ensure_fast_blas` does); every cblas_sgemm layout it can take is
checked against numpy in float64, and so are MLX's matmuls on top of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mlx_transformer.cpu import gemv
from tests.test_blas import FOUND, clean_env, needs_openblas


def test_off_or_without_a_compiler_there_is_nothing_to_preload(tmp_path):
    assert gemv.forward_library({gemv.SETTING: "off", "HOME": str(tmp_path)}) is None
    assert gemv.forward_library({"PATH": str(tmp_path), "HOME": str(tmp_path)}) is None
    assert not (tmp_path / ".cache").exists()  # nothing half-built left behind


def test_builds_once_into_the_cache_folder(tmp_path):
    env = {"PATH": os.environ["PATH"], "XDG_CACHE_HOME": str(tmp_path)}
    path = gemv.forward_library(env)
    if path is None:
        pytest.skip("no C compiler")
    assert os.path.dirname(path) == str(tmp_path / "mlx-transformer")
    stamp = os.stat(path).st_mtime_ns
    assert gemv.forward_library(env) == path and os.stat(path).st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "mlx-transformer").iterdir()] == [os.path.basename(path)]


# Every row-major layout with M == 1 or N == 1 (and a plain GEMM, passed through), strided
# leading dimensions, alpha/beta, and a NaN-filled output with beta = 0 (it must not be read).
CBLAS_CHILD = textwrap.dedent(
    """
    import ctypes, itertools, json
    import numpy as np
    lib = ctypes.CDLL(None)
    P, F = ctypes.c_void_p, ctypes.c_float
    rng = np.random.default_rng(0)
    worst, cases = 0.0, 0

    def stored(rows, cols, pad):  # a row-major matrix inside a wider buffer: leading dim cols+pad
        buf = rng.standard_normal((rows, cols + pad)).astype(np.float32)
        return buf, buf[:, :cols]

    # M == 1 / N == 1: sgemv; 2 <= M <= 16 with B transposed: the few-rows kernel (rows in
    # fours and the rest, K past a multiple of 8); (5, 7, 3) and M = 17: OpenBLAS as before.
    shapes = [(1, 37, 19), (23, 1, 19), (1, 1, 19), (5, 7, 3), (7, 37, 19), (16, 9, 40),
              (4, 5, 8), (17, 6, 24)]
    for M, N, K in shapes:
        for ta, tb, pad, (alpha, beta) in itertools.product(
            (111, 112), (111, 112), (0, 3), ((1.0, 0.0), (2.0, 0.5))
        ):
            abuf, a = stored(*((K, M) if ta == 112 else (M, K)), pad)
            bbuf, b = stored(*((N, K) if tb == 112 else (K, N)), pad)
            cbuf, c = stored(M, N, pad)
            if beta == 0.0:
                cbuf[:] = np.nan
            want = alpha * ((a.T if ta == 112 else a).astype(np.float64)
                            @ (b.T if tb == 112 else b).astype(np.float64))
            if beta:
                want += beta * c.astype(np.float64)
            lib.cblas_sgemm(101, ta, tb, M, N, K, F(alpha), abuf.ctypes.data_as(P),
                            abuf.shape[1], bbuf.ctypes.data_as(P), bbuf.shape[1], F(beta),
                            cbuf.ctypes.data_as(P), cbuf.shape[1])
            worst = max(worst, float(np.abs(cbuf[:, :N] - want).max()))
            cases += 1
    print(json.dumps({"err": worst, "cases": cases, "ours": lib.mlx_transformer_gemv_forward()}))
    """
)

MLX_CHILD = textwrap.dedent(
    """
    import json
    from mlx_transformer.cpu.blas import blas_info, ensure_fast_blas
    ensure_fast_blas()
    import mlx.core as mx
    import numpy as np
    rng = np.random.default_rng(1)
    w = rng.standard_normal((300, 96)).astype(np.float32)
    x = rng.standard_normal((1, 96)).astype(np.float32)
    x8 = rng.standard_normal((8, 1, 99)).astype(np.float32)  # batch 8, one token each
    q = rng.standard_normal((2, 4, 1, 16)).astype(np.float32)  # decode attention: one query
    k = rng.standard_normal((2, 4, 50, 16)).astype(np.float32)
    w8 = rng.standard_normal((50, 99)).astype(np.float32)
    W, X, Q, Kc = (mx.array(t) for t in (w, x, q, k))
    pairs = [
        (X @ W.T, x @ w.T.astype(np.float64)),               # a linear layer at batch 1
        (mx.array(x8) @ mx.array(w8).T, x8 @ w8.T.astype(np.float64)),  # ... at batch 8
        (W @ X.T, w.astype(np.float64) @ x.T),               # one output column
        (X[:, :50] @ W[:50, :], x[:, :50] @ w[:50].astype(np.float64)),  # strided views
        (Q @ Kc.swapaxes(-1, -2), q @ k.swapaxes(-1, -2).astype(np.float64)),  # batched scores
        (mx.softmax(Q @ Kc.swapaxes(-1, -2), axis=-1) @ Kc, None),
    ]
    s = q.astype(np.float64) @ k.swapaxes(-1, -2)
    p = np.exp(s - s.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    pairs[-1] = (pairs[-1][0], p @ k)
    err = max(float(np.abs(np.array(got) - want).max()) for got, want in pairs)
    print(json.dumps({"err": err, "info": blas_info()}))
    """
)


def run_child(code: str, env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@needs_openblas
@pytest.mark.parametrize("threads", ["1", "2"])  # 2: the few-rows kernel steps aside for OpenBLAS
def test_cblas_sgemm_in_front_of_openblas_matches_float64_in_every_layout(tmp_path, threads):
    forward = gemv.forward_library({**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    if forward is None:
        pytest.skip("no C compiler")
    env = {**clean_env(), "LD_PRELOAD": f"{forward} {FOUND[0].path}"}
    env["OPENBLAS_NUM_THREADS"] = threads
    out = run_child(CBLAS_CHILD, env)
    assert out["ours"] == 1 and out["cases"] == 8 * 16  # our cblas_sgemm took the calls
    assert out["err"] < 1e-4  # fp32 sums of <= 40 terms of size ~1 (x2 with alpha)


@needs_openblas
def test_mlx_decode_products_run_through_it_with_float64_results(tmp_path):
    env = {**clean_env(), "XDG_CACHE_HOME": str(tmp_path)}
    out = run_child(MLX_CHILD, env)
    info = out["info"]
    assert info["blas"] == "openblas" and info["library"] == os.path.realpath(FOUND[0].path)
    assert info["gemv_forward"].startswith(str(tmp_path / "mlx-transformer" / "gemv_forward-"))
    assert out["err"] < 1e-4
    off = run_child(MLX_CHILD, {**env, gemv.SETTING: "off"})  # OpenBLAS alone: same answers
    assert "gemv_forward" not in off["info"] and off["err"] < 1e-4
