"""How a training step scales: context 64 → 2048 at fixed width, and width at fixed context.

Our compiled MLX training step (the `mlx_runner` of scripts/bench_train.py: GPT-2 style, AdamW,
clipping) on random tokens. The context sweep keeps the tokens per step fixed (batch =
`--tokens` / context), so the time per token would be flat if everything were linear; attention's
score matmuls (Q·Kᵀ and A·V) grow with the context, so the time per token is fitted as

    seconds per token = a + b · L        (per sequence: a·L + b·L²)

and the context where the quadratic part equals the linear part is L* = a / b. The same split
from FLOPs: per token and layer, the weight matmuls cost 2·(4D² + 2·D·F) (×3 with the backward
pass) and the attention scores 2·2·L·D (×3), so attention equals the rest at L = 2D + F
(= 6D for F = 4D) if both ran at the same speed; the measured L* says how far they do not.
Peak memory is `mx.get_peak_memory()` (reset before each configuration). `--window W` adds the
second curve: the same steps with a sliding window of W (blocked attention, O(L·W)).

    python scripts/bench_scaling.py [--json runs/bench/scaling.json] [--plot docs/scaling.png]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import print_json  # noqa: E402

from mlx_transformer.cpu.blas import ensure_fast_blas  # noqa: E402  (before mlx loads)

CONTEXTS = (64, 128, 256, 512, 1024, 2048)
WIDTHS = (128, 256, 384, 512)
LAYERS, HEAD_DIM, VOCAB = 4, 64, 65


def step_seconds(
    width: int, context: int, tokens: int, steps: int, trials: int, window: int | None = None
) -> dict:
    """Median seconds per training step and peak MLX memory for one shape (and sliding window)."""
    import mlx.core as mx
    from bench_train import mlx_runner

    c = dict(
        layers=LAYERS,
        heads=width // HEAD_DIM,
        width=width,
        context=context,
        batch=max(1, tokens // context),
        vocab=VOCAB,
        window=window,
    )
    mx.clear_cache()
    mx.reset_peak_memory()
    run = mlx_runner(c)
    run(2)  # warm-up: compile for this shape
    times = []
    for t in range(trials):
        tic = time.perf_counter()
        run(steps, offset=t)
        times.append((time.perf_counter() - tic) / steps)
    times.sort()
    step = times[len(times) // 2]
    n_tokens = c["batch"] * context
    return {
        **c,
        "step_s": step,
        "us_per_token": step / n_tokens * 1e6,
        "peak_memory_mb": mx.get_peak_memory() / 2**20,
        "trials_s": times,
    }


def flops_per_token(width: int, context: int) -> dict:
    """Forward+backward FLOPs per token per layer: weight matmuls vs attention scores."""
    D, F = width, 4 * width
    return {"linear": 3 * 2 * (4 * D * D + 2 * D * F), "attention": 3 * 2 * 2 * context * D}


def fit_linear_quadratic(points: list[tuple[int, float]]) -> dict:
    """Least squares of time per token = a + b·L; L* = a / b where the two parts are equal."""
    import numpy as np

    L = np.array([p[0] for p in points], float)
    y = np.array([p[1] for p in points], float)
    (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(L), L], 1), y, rcond=None)
    pred = a + b * L
    r2 = 1 - ((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30)
    return {
        "a_us": float(a),
        "b_us": float(b),
        "crossover_context": float(a / b) if b > 0 else None,
        "r2": float(r2),
    }


def run(
    contexts=CONTEXTS,
    widths=WIDTHS,
    width=256,
    context=256,
    tokens=4096,
    steps=3,
    trials=3,
    window=None,
) -> dict:
    by_context, by_context_window = [], []
    for L in contexts:
        by_context.append(step_seconds(width, L, tokens, steps, trials))
        print(
            f"  width {width}, context {L}: {by_context[-1]['step_s']:.3f} s/step", file=sys.stderr
        )
        if window:  # the second curve: the same model with a sliding window
            by_context_window.append(step_seconds(width, L, tokens, steps, trials, window))
            r = by_context_window[-1]
            print(f"  ... window {window}: {r['step_s']:.3f} s/step", file=sys.stderr)
    by_width = []
    for D in widths:
        by_width.append(step_seconds(D, context, tokens, steps, trials))
        print(
            f"  width {D}, context {context}: {by_width[-1]['step_s']:.3f} s/step", file=sys.stderr
        )
    fit = fit_linear_quadratic([(r["context"], r["us_per_token"]) for r in by_context])
    flops = {L: flops_per_token(width, L) for L in contexts}
    flop_crossover = 2 * width + 4 * width  # attention == linear when 4·L·D = 8D² + 4DF
    for r in by_context:
        a, lin = fit["b_us"] * r["context"], fit["a_us"]
        r["attention_share_fit"] = a / (a + lin) if fit["b_us"] > 0 else None
        f = flops[r["context"]]
        r["attention_share_flops"] = f["attention"] / (f["attention"] + f["linear"])
    return {
        "fixed": {"width": width, "context": context, "tokens_per_step": tokens, "layers": LAYERS},
        "by_context": by_context,
        **({"window": window, "by_context_window": by_context_window} if window else {}),
        "by_width": by_width,
        "fit": fit,
        "flop_crossover_context": flop_crossover,
    }


def plot(results: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    ctx, wid, fit = results["by_context"], results["by_width"], results["fit"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    L = [r["context"] for r in ctx]
    ax = axes[0]
    ax.plot(L, [r["us_per_token"] for r in ctx], "o-", label="measured")
    ax.plot(L, [fit["a_us"] + fit["b_us"] * x for x in L], "--", label="fit a + b·L")
    ax.axhline(fit["a_us"], color="gray", lw=0.8, label="linear part a")
    if fit["crossover_context"]:
        ax.axvline(fit["crossover_context"], color="red", lw=0.8, label="L* = a/b")
    windowed = results.get("by_context_window") or []
    if windowed:
        label = f"window {results['window']} (blocked)"
        ax.plot([r["context"] for r in windowed], [r["us_per_token"] for r in windowed], "s-",
                label=label)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set(xlabel="context L", ylabel="µs per token (train step)")
    ax.set_title(
        f"width {results['fixed']['width']}, {results['fixed']['tokens_per_step']} tok/step"
    )
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(L, [r["peak_memory_mb"] for r in ctx], "o-", label="full attention")
    if windowed:
        ax.plot([r["context"] for r in windowed], [r["peak_memory_mb"] for r in windowed], "s-",
                label=f"window {results['window']}")  # fmt: skip
        ax.legend(fontsize=8)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set(xlabel="context L", ylabel="peak MLX memory (MiB)")
    ax.set_title("peak memory, same tokens per step")
    ax = axes[2]
    D = [r["width"] for r in wid]
    ax.plot(D, [r["us_per_token"] for r in wid], "o-", label="µs per token")
    ax.set(xlabel="width D", ylabel="µs per token")
    ax2 = ax.twinx()
    ax2.plot(D, [r["peak_memory_mb"] for r in wid], "s--", color="C1", label="peak MiB")
    ax2.set_ylabel("peak MLX memory (MiB)")
    ax.legend(ax.get_lines() + ax2.get_lines(), ["µs per token", "peak MiB"], fontsize=8)
    ax.set_title(f"context {results['fixed']['context']}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(results: dict) -> str:
    fit = results["fit"]
    L = fit["crossover_context"]
    where = f"L* ≈ {L:.0f}" if L else "no quadratic term measured"
    return (
        f"time per token = {fit['a_us']:.2f} µs + {fit['b_us'] * 1e3:.2f} ns · L "
        f"(R² {fit['r2']:.3f}): attention's quadratic part equals the rest at {where}; "
        f"the FLOP count alone puts it at L = {results['flop_crossover_context']}"
    )


def main(argv=None) -> int:
    ensure_fast_blas()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    p.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch × context)")
    p.add_argument("--steps", type=int, default=2, help="steps per trial")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--window", type=int, help="also measure each context with this window")
    p.add_argument("--quick", action="store_true", help="three small contexts and widths")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write the figure here (PNG)")
    args = p.parse_args(argv)
    contexts = [int(x) for x in args.contexts.split(",")]
    widths = [int(x) for x in args.widths.split(",")]
    if args.quick:
        contexts, widths, args.tokens, args.steps, args.trials = (
            [64, 128, 256],
            [64, 128],
            512,
            1,
            1,
        )
    results = run(
        contexts, widths, tokens=args.tokens, steps=args.steps, trials=args.trials,
        window=args.window,
    )  # fmt: skip
    results["summary"] = summary(results)
    print(results["summary"], file=sys.stderr)
    if args.plot:
        plot(results, args.plot)
    print_json(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
