"""Where generation time goes: ours vs mlx-lm on the same weights, phase by phase, interleaved.

Builds the weights of scripts/bench_generate.py (`--size small|large`), then for batch 1 and
batch 8 (prompts of `--prompt-tokens` tokens) times, alternating the two peers trial by trial,
each phase of the path to the first token and of one decode step, with `mx.eval` after each
phase (so a phase's time is its own):

  ours    prefill (all prompt tokens but the last) · static buffers filled · first step + argmax
  mlx-lm  prefill (its `PromptProcessingBatch.prompt` for batch 8, `model(...)` for batch 1) ·
          first step + argmax

and the steady decode step (median ms/token). `--cprofile` prints the top Python functions of
one of our batch-8 generations. `--all-cores` adds our phases with OpenBLAS on every core
(`blas.gemm_bound`; the default is half the cores, see cpu/blas.py) as a third column. Medians over
`--trials`; ratio = mlx-lm time / ours.

    python scripts/profile_generate.py --size small --trials 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_transformer.cpu import blas  # noqa: E402


def timed(fn):
    import mlx.core as mx

    tic = time.perf_counter()
    out = fn()
    mx.eval(out)
    return out, time.perf_counter() - tic


def ours_phases(model, prompts, steps: int) -> dict:
    import mlx.core as mx

    from mlx_transformer.generate.decode import StaticCacheDecoder, left_pad, prefill

    ids, mask = left_pad(prompts)
    B, L = ids.shape
    t = {}
    tic = time.perf_counter()
    cache = prefill(model, ids[:, :-1], None)
    mx.eval([c.state for c in cache])
    t["prefill"] = time.perf_counter() - tic
    dec, t["buffers"] = timed(lambda: StaticCacheDecoder(model, cache, None, L + steps + 1, B))
    mx.eval(dec.keys, dec.values)
    y, t["first_step"] = timed(lambda: mx.argmax(dec(ids[:, -1]), axis=-1).astype(mx.int32))
    tic = time.perf_counter()
    for _ in range(steps):
        y = mx.argmax(dec(y), axis=-1).astype(mx.int32)
        mx.eval(y)
    t["decode_step"] = (time.perf_counter() - tic) / steps
    return t


def theirs_phases(model, prompts, steps: int) -> dict:
    import mlx.core as mx
    from mlx_lm.generate import PromptProcessingBatch
    from mlx_lm.models.cache import make_prompt_cache

    B = len(prompts)
    t = {}
    tic = time.perf_counter()
    if B == 1:
        cache = make_prompt_cache(model)
        model(mx.array(prompts)[:, :-1], cache=cache)
        mx.eval([c.state for c in cache])
        t["prefill"] = time.perf_counter() - tic
        last = mx.array([p[-1] for p in prompts])

        def step(tokens):
            return mx.argmax(model(tokens[:, None], cache=cache)[:, -1], axis=-1)
    else:
        batch = PromptProcessingBatch(
            model, list(range(B)), [make_prompt_cache(model) for _ in prompts]
        )
        batch.prompt([p[:-1] for p in prompts])
        t["prefill"] = time.perf_counter() - tic
        cache = batch.prompt_cache
        last = mx.array([p[-1] for p in prompts])

        def step(tokens):
            return mx.argmax(model(tokens[:, None], cache=cache)[:, -1], axis=-1)

    t["buffers"] = 0.0
    y, t["first_step"] = timed(lambda: step(last))
    tic = time.perf_counter()
    for _ in range(steps):
        y = step(y)
        mx.eval(y)
    t["decode_step"] = (time.perf_counter() - tic) / steps
    return t


def all_cores(model, prompts, steps: int) -> dict:
    with blas.gemm_bound():
        return ours_phases(model, prompts, steps)


def cprofile_ours(model, prompts, steps):
    import cProfile
    import pstats

    from mlx_transformer.generate.api import batch_generate_step

    pr = cProfile.Profile()
    pr.enable()
    for _ in batch_generate_step(prompts, model, max_tokens=steps):
        pass
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(15)


def main(argv=None) -> int:
    blas.ensure_fast_blas()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per trial")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--all-cores", action="store_true", help="also ours with BLAS on all cores")
    args = p.parse_args(argv)

    import numpy as np
    from bench_generate import build_peers

    print(f"load average {os.getloadavg()}  {blas.blas_summary()}")
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs, _ = build_peers(args.size, tmp)
    rng = np.random.default_rng(1)
    for B in [int(b) for b in args.batches.split(",")]:
        prompts = rng.integers(4, 8000, (B, args.prompt_tokens)).tolist()
        peers = {"ours": (ours_phases, ours), "mlx_lm": (theirs_phases, theirs)}
        if args.all_cores:
            peers["ours_all_cores"] = (all_cores, ours)
        runs = {name: [] for name in peers}
        for t in range(args.trials + 1):  # the first round warms up
            for name, (run, model) in peers.items():
                r = run(model, prompts, args.steps if t else 2)
                if t:
                    runs[name].append(r)
        print(f"\n{args.size} batch {B}, ms (median of {args.trials})")
        extra = f"{'all cores':>11}{'ratio':>7}" if args.all_cores else ""
        print(f"{'phase':14}{'ours':>9}{'mlx-lm':>9}{'ratio':>7}{extra}")
        for k in runs["ours"][0]:
            a, b = (statistics.median(r[k] for r in runs[n]) * 1e3 for n in ("ours", "mlx_lm"))
            line = f"{k:14}{a:9.2f}{b:9.2f}{(b / a if a else 0):7.2f}"
            if args.all_cores:
                c = statistics.median(r[k] for r in runs["ours_all_cores"]) * 1e3
                line += f"{c:11.2f}{(b / c if c else 0):7.2f}"
            print(line)
        if args.cprofile and B > 1:
            cprofile_ours(ours, prompts, args.steps)
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
