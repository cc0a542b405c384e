"""Sliding-window attention: what a window buys in training and in generation.

attention  the attention op alone, forward and backward (B 1, 4 heads of 64): causal full
        attention, the window as a dense mask over the L x L scores (what MLX's fused kernel
        offers: no block-sparse mode) and blocked (`local_attention.blocked_attention`) — time
        and peak memory vs L, where O(L²) and O(L·W) part.
train   training step time and peak memory vs context L, full attention vs a window of 256
        (`bench_scaling.step_seconds`: same tokens per step at every L; the model takes the
        blocked path for L > 2W).
decode  greedy generation of 8x the window after a short prompt: ours (rolling prefill, then
        the compiled ring-buffer step) vs mlx-lm's `generate_step` with a `RotatingKVCache`
        of the window per layer, on the same Llama-style weights (written by `save_hf`, read by
        mlx-lm). Tokens must agree. Peak memory after 2x and after 8x the window: equal means
        the cache is constant.
stall   `--overflow slide` on the same weights without a window (context = the window): the
        re-prefill each time the context fills, as the longest step against the median step,
        next to the rolling cache's.

  python scripts/bench_window.py [--only train,decode,stall] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import print_json  # noqa: E402
from bench_generate import LLAMA as GENERATE_LLAMA  # noqa: E402
from bench_generate import SIZES  # noqa: E402

from mlx_transformer.cpu.blas import ensure_fast_blas  # noqa: E402  (before mlx loads)

WINDOW = 256
# bench_generate's small Llama; each model here sets its own max_position_embeddings.
LLAMA = {**GENERATE_LLAMA, **SIZES["small"]}
LLAMA.pop("max_position_embeddings")


def train_rows(contexts, window, tokens, steps, trials) -> list[dict]:
    from bench_scaling import step_seconds

    rows = []
    for L in contexts:
        for W in (None, window):
            r = step_seconds(256, L, tokens, steps, trials, window=W)
            rows.append({"context": L, "window": W, **r})
            label = "full" if W is None else f"window {W}"
            print(
                f"  train L={L} {label}: {r['step_s']:.3f} s/step, {r['peak_memory_mb']:.0f} MiB",
                file=sys.stderr,
            )
    return rows


def attention_rows(contexts, window, trials) -> list[dict]:
    import mlx.core as mx

    from mlx_transformer import ops
    from mlx_transformer.local_attention import WindowMask, blocked_attention
    from mlx_transformer.model import key_positions

    B, H, hd = 1, 4, 64
    kinds = {
        "full": lambda q, k, v, m: ops.scaled_dot_product_attention(
            q, k, v, hd**-0.5, "causal", True
        ),
        "dense": lambda q, k, v, m: ops.scaled_dot_product_attention(
            q, k, v, hd**-0.5, m.dense, True
        ),
        "blocked": lambda q, k, v, m: blocked_attention(q, k, v, hd**-0.5, m, True),
    }
    rows = []
    for L in contexts:
        q, k, v = (mx.random.normal((B, H, L, hd)) for _ in range(3))
        positions = key_positions(None, L)
        mask = WindowMask(positions, positions, window)
        row = {"context": L, "window": window}
        for name, attend in kinds.items():

            def loss(q, k, v, attend=attend, mask=mask):
                return attend(q, k, v, mask).sum()

            step = mx.value_and_grad(loss, (0, 1, 2))
            mx.eval(step(q, k, v))
            mx.clear_cache()
            mx.reset_peak_memory()
            times = []
            for _ in range(trials):
                tic = time.perf_counter()
                mx.eval(step(q, k, v))
                times.append(time.perf_counter() - tic)
            row[name] = {
                "ms": statistics.median(times) * 1e3,
                "peak_mb": mx.get_peak_memory() / 2**20,
            }
        rows.append(row)
        print(f"  attention L={L}: {row}", file=sys.stderr)
    return rows


def models(window: int, context: int):
    """(ours with the window, the same weights without one and context = window, HF folder)."""
    import mlx.core as mx

    from mlx_transformer.checkpoint.hf import save_hf
    from mlx_transformer.config import ModelConfig
    from mlx_transformer.model import Transformer

    mx.random.seed(0)
    plain = Transformer(ModelConfig(**LLAMA, max_position_embeddings=window))
    windowed = Transformer(
        ModelConfig(**LLAMA, max_position_embeddings=context, sliding_window=window)
    )
    windowed.update(plain.parameters())
    for m in (plain, windowed):
        m.eval()
    mx.eval(plain.parameters())
    folder = Path(tempfile.mkdtemp()) / "hf"
    save_hf(plain, folder)
    return windowed, plain, folder


def timed_steps(steps) -> list[float]:
    """Seconds of each step of a token iterator (the first includes the prompt)."""
    times, tic = [], time.perf_counter()
    for _ in steps:
        now = time.perf_counter()
        times.append(now - tic)
        tic = now
    return times


def decode_rows(window: int, prompt_tokens: int, trials: int) -> dict:
    import mlx.core as mx
    import numpy as np
    from mlx_lm.generate import generate_step as their_step
    from mlx_lm.models.cache import RotatingKVCache
    from mlx_lm.utils import load_model

    from mlx_transformer.generate.api import generate_step

    n = 8 * window
    ours, _, folder = models(window, context=512)
    theirs, _ = load_model(folder)
    prompt = np.random.default_rng(1).integers(4, 8000, prompt_tokens).tolist()

    def run_ours(tokens):
        return generate_step(prompt, ours, max_tokens=tokens)

    def run_theirs(tokens):
        cache = [RotatingKVCache(max_size=window) for _ in theirs.layers]
        steps = their_step(mx.array(prompt), theirs, max_tokens=tokens, prompt_cache=cache)
        return (int(t) for t, _ in steps)

    a, b = list(run_ours(n)), list(run_theirs(n))
    agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    out = {"window": window, "new_tokens": n, "tokens_agree": agree}
    for name, run in (("ours", run_ours), ("mlx_lm", run_theirs)):
        rates = []
        for _ in range(trials):
            times = timed_steps(run(n))
            rates.append((n - 1) / sum(times[1:]))
        peaks = {}
        for tokens in (2 * window, n):
            mx.clear_cache()
            mx.reset_peak_memory()
            for _ in run(tokens):
                pass
            peaks[tokens] = mx.get_peak_memory() / 2**20
        out[name] = {
            "generation_tps": statistics.median(rates),
            "peak_mb_after_2w": peaks[2 * window],
            "peak_mb_after_8w": peaks[n],
        }
        print(f"  decode {name}: {out[name]}", file=sys.stderr)
    out["ratio"] = out["ours"]["generation_tps"] / out["mlx_lm"]["generation_tps"]
    return out


def stall_rows(window: int, prompt_tokens: int) -> dict:
    import numpy as np

    from mlx_transformer.generate.api import generate_step

    ours, plain, _ = models(window, context=512)
    prompt = np.random.default_rng(2).integers(4, 8000, prompt_tokens).tolist()
    n = 4 * window
    out = {"window": window, "new_tokens": n}
    runs = (
        ("slide", lambda: generate_step(prompt, plain, max_tokens=n, overflow="slide")),
        ("rolling", lambda: generate_step(prompt, ours, max_tokens=n)),
    )
    for name, run in runs:
        list(run())  # warm-up (compiles)
        steps = timed_steps(run())[1:]
        median = statistics.median(steps)
        out[name] = {
            "median_step_ms": median * 1e3,
            "longest_step_ms": max(steps) * 1e3,
            "steps_over_3x_median": sum(t > 3 * median for t in steps),  # the re-prefills
            "total_s": sum(steps),
        }
        print(f"  stall {name}: {out[name]}", file=sys.stderr)
    return out


def main(argv=None) -> int:
    ensure_fast_blas()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="attention,train,decode,stall")
    p.add_argument("--contexts", default="256,512,1024,2048")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per training step")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="window 32, short runs (a smoke test)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    window, contexts, prompt = WINDOW, [int(x) for x in args.contexts.split(",")], 128
    tokens, steps, trials = args.tokens, 2, args.trials
    if args.quick:
        window, contexts, prompt, tokens, steps, trials = 32, [64, 128], 16, 256, 1, 1
    only = args.only.split(",")
    results: dict = {}
    if "attention" in only:
        results["attention"] = attention_rows([*contexts, 2 * contexts[-1]], window, trials + 2)
    if "train" in only:
        results["train"] = train_rows(contexts, window, tokens, steps, trials)
    if "decode" in only:
        results["decode"] = decode_rows(window, prompt, trials)
    if "stall" in only:
        results["stall"] = stall_rows(window, prompt)
    print_json(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
