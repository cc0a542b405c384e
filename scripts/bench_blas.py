"""Benchmark MLX's CPU path under the stock (reference) BLAS and under an optimized OpenBLAS.

Each configuration runs in its own subprocess (LD_PRELOAD is read only at start-up):
  stock            the BLAS bundled with the mlx-cpu wheel
  openblas-auto    OpenBLAS with its own CPU detection, 1 thread (shows what the coretype fix buys)
  openblas-t1/t2   OpenBLAS as ensure_fast_blas() sets it up, with 1 and 2 threads
  t1-gemv          the same, 1 thread, with cpu/gemv.py's cblas_sgemm in front (one-row
                   products go to sgemv: what ensure_fast_blas() preloads by default)

Workloads: fp32 matmuls (256/512/1024, GFLOP/s), matrix-vector products of decode's shapes (a
(1, 768) row times a (768, 3072) and a (768, 8000) matrix, GFLOP/s), and a small Transformer
(4 layers, width 128, vocab 512) doing a training step (forward + backward), a prefill and a
1-token decode loop (tokens/s). Reports medians of several trials, ratios to stock, and the
max abs difference of each result from stock's. Takes about a minute on 2 cores.

    python scripts/bench_blas.py [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlx_transformer.cpu import blas, gemv

MATMUL_SIZES = (256, 512, 1024)
MATVEC_SHAPES = ((3072, 768), (8000, 768))  # (out, in): an MLP's up projection, an LM head
LAYERS, WIDTH, VOCAB, HEADS = 4, 128, 512, 4
TRAIN_BATCH, TRAIN_LEN, PREFILL_LEN, DECODE_STEPS = 4, 64, 256, 32


# --------------------------------------------------------------------------- worker side


def _median_seconds(fn, trials: int) -> float:
    fn()  # warm-up: first calls allocate and build kernels
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _transformer(mx, seed: int = 0):
    """Weights of a tiny pre-norm Transformer and its forward pass (optionally with a KV cache)."""
    rng = __import__("numpy").random.default_rng(seed)

    def w(*shape):
        return mx.array(rng.standard_normal(shape).astype("float32") / shape[0] ** 0.5)

    params = {"embed": w(VOCAB, WIDTH)}
    for i in range(LAYERS):
        params[f"{i}.qkv"], params[f"{i}.out"] = w(WIDTH, 3 * WIDTH), w(WIDTH, WIDTH)
        params[f"{i}.up"], params[f"{i}.down"] = w(WIDTH, 4 * WIDTH), w(4 * WIDTH, WIDTH)
    ones = mx.ones((WIDTH,))

    def forward(params, tokens, cache=None):
        B, L = tokens.shape
        x = params["embed"][tokens]  # (B, L, D)
        for i in range(LAYERS):
            h = mx.fast.rms_norm(x, ones, 1e-5) @ params[f"{i}.qkv"]
            q, k, v = (t.reshape(B, L, HEADS, -1).transpose(0, 2, 1, 3) for t in h.split(3, -1))
            if cache is not None:  # decode: attend to everything cached so far
                if i in cache:
                    k = mx.concatenate([cache[i][0], k], axis=2)
                    v = mx.concatenate([cache[i][1], v], axis=2)
                cache[i] = (k, v)
            mask = "causal" if L > 1 else None
            a = mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask)
            x = x + a.transpose(0, 2, 1, 3).reshape(B, L, WIDTH) @ params[f"{i}.out"]
            h = mx.fast.rms_norm(x, ones, 1e-5) @ params[f"{i}.up"]
            x = x + (h * mx.sigmoid(h)) @ params[f"{i}.down"]
        return mx.fast.rms_norm(x, ones, 1e-5) @ params["embed"].T  # (B, L, vocab)

    return params, forward


def _run_worker(out_dir: Path, trials: int) -> None:
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    results: dict[str, dict[str, float]] = {}
    arrays: dict[str, np.ndarray] = {}
    for n in MATMUL_SIZES:
        a, b = (mx.array(rng.standard_normal((n, n)).astype(np.float32)) for _ in range(2))
        seconds = _median_seconds(lambda a=a, b=b: mx.eval(a @ b), trials)
        results[f"matmul {n}"] = {"seconds": seconds, "rate": 2 * n**3 / seconds / 1e9}
        arrays[f"matmul {n}"] = np.array(a @ b)
    for n, k in MATVEC_SHAPES:
        x = mx.array(rng.standard_normal((1, k)).astype(np.float32))
        w = mx.array(rng.standard_normal((n, k)).astype(np.float32))
        seconds = _median_seconds(lambda x=x, w=w: mx.eval(x @ w.T), trials)
        results[f"matvec {n}x{k}"] = {"seconds": seconds, "rate": 2 * n * k / seconds / 1e9}
        arrays[f"matvec {n}x{k}"] = np.array(x @ w.T)

    params, forward = _transformer(mx)
    tokens = mx.array(rng.integers(0, VOCAB, (TRAIN_BATCH, TRAIN_LEN + 1)))

    def loss_fn(params):
        logits = forward(params, tokens[:, :-1])
        return mx.mean(
            mx.logsumexp(logits, -1)
            - mx.take_along_axis(logits, tokens[:, 1:, None], -1).squeeze(-1)
        )

    grad_fn = mx.value_and_grad(loss_fn)
    seconds = _median_seconds(lambda: mx.eval(grad_fn(params)), trials)
    loss, grads = grad_fn(params)
    results["train step"] = {"seconds": seconds, "rate": TRAIN_BATCH * TRAIN_LEN / seconds}
    arrays["train step"] = np.concatenate(
        [np.array(loss).ravel(), np.array(grads["0.qkv"]).ravel()]
    )

    prompt = mx.array(rng.integers(0, VOCAB, (1, PREFILL_LEN)))
    seconds = _median_seconds(lambda: mx.eval(forward(params, prompt)), trials)
    results["prefill"] = {"seconds": seconds, "rate": PREFILL_LEN / seconds}
    arrays["prefill"] = np.array(forward(params, prompt)[0, -1])

    def decode():
        cache: dict = {}
        token = prompt[:, :1]
        for _ in range(DECODE_STEPS):
            token = mx.argmax(forward(params, token, cache)[:, -1:], -1)
            mx.eval(token)  # a real sampler needs each token before the next step
        return token

    seconds = _median_seconds(decode, trials)
    results["decode"] = {"seconds": seconds, "rate": DECODE_STEPS / seconds}

    np.savez(out_dir / "arrays.npz", **arrays)
    payload = {"results": results, "blas": blas.blas_info()}
    (out_dir / "results.json").write_text(json.dumps(payload))


# --------------------------------------------------------------------------- parent side


def _configs() -> dict[str, dict[str, str]]:
    """Environment overrides per configuration (MLX_TRANSFORMER_BLAS=reference: no re-exec)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENBLAS_", "LD_PRELOAD"))}
    base[blas.SETTING_VAR] = "reference"
    configs = {"stock": base}
    found = blas.find_optimized_blas({k: v for k, v in base.items() if k != blas.SETTING_VAR})
    if found is None:
        print(blas.slow_notice(), file=sys.stderr)
        return configs
    probe, coretype = found
    fast = {**base, "LD_PRELOAD": probe.path}
    if coretype:
        configs["openblas-auto"] = {**fast, "OPENBLAS_NUM_THREADS": "1"}
        fast["OPENBLAS_CORETYPE"] = coretype
    configs["openblas-t1"] = {**fast, "OPENBLAS_NUM_THREADS": "1"}
    configs["openblas-t2"] = {**fast, "OPENBLAS_NUM_THREADS": "2"}
    forward = gemv.forward_library(base)
    if forward:
        preload = f"{forward} {probe.path}"
        configs["t1-gemv"] = {**fast, "LD_PRELOAD": preload, "OPENBLAS_NUM_THREADS": "1"}
    return configs


def _run_config(name: str, env: dict[str, str], trials: int, tmp: Path) -> dict:
    out_dir = tmp / name
    out_dir.mkdir()
    cmd = [sys.executable, __file__, "--worker", str(out_dir), "--trials", str(trials)]
    subprocess.run(cmd, env=env, check=True)
    payload = json.loads((out_dir / "results.json").read_text())
    payload["arrays"] = out_dir / "arrays.npz"
    return payload


def _report(runs: dict[str, dict]) -> dict:
    import numpy as np

    stock = runs["stock"]
    stock_arrays = np.load(stock["arrays"])
    table: dict = {"configs": {}, "blas": {k: v["blas"] for k, v in runs.items()}}
    workloads = list(stock["results"])
    print(f"{'workload':<12} {'unit':<9}" + "".join(f"{name:>16}" for name in runs))
    for work in workloads:
        unit = "GFLOP/s" if work.startswith(("matmul", "matvec")) else "tokens/s"
        cells = []
        for name, run in runs.items():
            rate = run["results"][work]["rate"]
            ratio = rate / stock["results"][work]["rate"]
            cells.append(f"{rate:>9.1f} ({ratio:>4.1f}x)")
            entry = table["configs"].setdefault(name, {})
            entry[work] = {"rate": rate, "unit": unit, "ratio_to_stock": ratio}
            if work in stock_arrays.files:
                diff = np.abs(np.load(run["arrays"])[work] - stock_arrays[work]).max()
                entry[work]["max_abs_diff"] = float(diff)
        print(f"{work:<12} {unit:<9}" + "".join(f"{c:>16}" for c in cells))
    diffs = {
        name: max(w.get("max_abs_diff", 0.0) for w in entry.values())
        for name, entry in table["configs"].items()
    }
    print("max abs diff vs stock: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--trials", type=int, default=5, help="timed runs per workload")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _run_worker(args.worker, args.trials)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name, env in _configs().items():
            t0 = time.perf_counter()
            runs[name] = _run_config(name, env, args.trials, Path(tmp))
            print(f"# {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        table = _report(runs)
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
