"""Where a training step's time goes (Linux CPU): the step's phases, then each part of a block.

Times are medians of CPU time (`time.process_time`, all threads of this process), which a
loaded machine inflates far less than wall time; wall time is printed beside the phases. Each
part is one `mx.compile`d function, timed forward and forward + backward (`mx.vjp` with a
fixed cotangent), on the shapes of `scripts/bench_train.py`'s configs.

    .venv/bin/python scripts/profile_train.py --config small
    .venv/bin/python scripts/profile_train.py --config medium --trials 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mlx_transformer.cpu.blas import ensure_fast_blas  # noqa: E402  (must run before mlx loads)


def median_ms(fn, trials: int, warmup: int = 3) -> tuple[float, float]:
    """(CPU ms, wall ms) medians of fn()."""
    for _ in range(warmup):
        fn()
    cpu, wall = [], []
    for _ in range(trials):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return sorted(cpu)[trials // 2] * 1e3, sorted(wall)[trials // 2] * 1e3


def phases(c: dict, trials: int) -> None:
    import mlx.core as mx
    import numpy as np
    from bench_train import mlx_model

    from mlx_transformer.cpu.training import training_environment
    from mlx_transformer.train.args import TrainingArgs
    from mlx_transformer.train.step import Stepper, loss_sum, make_optimizer

    model = mlx_model(c)
    w = np.random.default_rng(0).integers(0, c["vocab"], (c["batch"], c["context"] + 1))
    batch = (mx.array(w[:, :-1].astype(np.int32)), mx.array(w[:, 1:].astype(np.int32)), None, None)
    rows = []
    for streams in (1, 2):
        optimizer = make_optimizer(TrainingArgs(), model.trainable_parameters())
        with training_environment(streams):
            rows += step_phases(
                Stepper(model, optimizer, grad_clip=1.0, streams=streams), batch, trials
            )
    with training_environment(1):
        forward = mx.compile(lambda b: loss_sum(model, b)[0], inputs=[model.state])
        rows.append(
            ("forward and loss alone, 1 stream", median_ms(lambda: mx.eval(forward(batch)), trials))
        )
    print(f"{'phase':40s} {'CPU ms':>8s} {'wall ms':>8s}")
    for name, (cpu, wall) in rows:
        print(f"{name:40s} {cpu:8.1f} {wall:8.1f}")


def step_phases(stepper, batch, trials: int) -> list[tuple[str, tuple[float, float]]]:
    import mlx.core as mx

    acc = stepper.accumulate(batch)
    mx.eval(acc)
    n = len(stepper.streams)

    def step():
        mx.eval(stepper.state, stepper.step(batch))

    def update():
        mx.eval(stepper.state, stepper._update(*acc))

    return [
        (f"whole step, {n} stream(s)", median_ms(step, trials)),
        ("  building the graph (Python)", median_ms(lambda: stepper.step(batch), trials)),
        ("  forward + backward", median_ms(lambda: mx.eval(stepper.accumulate(batch)), trials)),
        ("  clip + AdamW update", median_ms(update, trials)),
    ]


def parts(c: dict, trials: int) -> None:
    import mlx.core as mx

    from mlx_transformer.cpu import fastmath

    B, L, D, H, V = c["batch"], c["context"], c["width"], c["heads"], c["vocab"]
    F = 4 * D
    mx.random.seed(0)

    def rand(*shape):
        return mx.random.normal(shape) * 0.1

    def time_part(fn, *args) -> tuple[float, float]:
        cot = mx.random.normal(fn(*args).shape)
        mx.eval(cot, *args)
        fwd = mx.compile(fn)
        both = mx.compile(lambda *a: mx.vjp(fn, list(a), [cot]))
        return (
            median_ms(lambda: mx.eval(fwd(*args)), trials)[0],
            median_ms(lambda: mx.eval(both(*args)), trials)[0],
        )

    x, xf = rand(B, L, D), rand(B, L, F)
    heads = (rand(B, H, L, D // H) for _ in range(3))
    targets = mx.random.randint(0, V, (B, L))

    def head_and_loss(x, e):
        logits = fastmath.linear(x, e)
        picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return (fastmath.logsumexp(logits) - picked).sum()[None]

    table = [
        ("LayerNorm (2 per block)", lambda x, w, b: mx.fast.layer_norm(x, w, b, 1e-5),
         (x, mx.ones(D), mx.zeros(D))),
        ("linear D->D (q, k, v, o: 4 per block)", fastmath.linear, (x, rand(D, D), mx.zeros(D))),
        ("linear D->4D (1 per block)", fastmath.linear, (x, rand(F, D), mx.zeros(F))),
        ("linear 4D->D (1 per block)", fastmath.linear, (xf, rand(D, F), mx.zeros(D))),
        ("GELU-tanh (1 per block)", fastmath.gelu_tanh, (xf,)),
        ("attention core, causal (1 per block)",
         lambda q, k, v: fastmath.scaled_dot_product_attention(q, k, v, (D // H) ** -0.5, "causal"),
         tuple(heads)),
        ("LM head + cross-entropy (once)", head_and_loss, (x, rand(V, D))),
        ("embeddings, token + position (once)",
         lambda e, p: e[targets] + p[None], (rand(V, D), rand(L, D))),
    ]  # fmt: skip
    title = f"part (B={B}, L={L}, D={D})"
    print(f"\n{title:40s} {'fwd':>8s} {'fwd+bwd':>8s}  CPU ms")
    for name, fn, args in table:
        f, fb = time_part(fn, *args)
        print(f"{name:40s} {f:8.2f} {fb:8.2f}")


def main() -> None:
    ensure_fast_blas()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="small", help="small | medium (bench_train's)")
    parser.add_argument("--trials", type=int, default=15)
    args = parser.parse_args()

    import mlx.core as mx
    from bench_train import CONFIGS

    mx.set_cache_limit(1 << 30)  # as training_environment does
    print(f"load average {os.getloadavg()}")
    phases(CONFIGS[args.config], args.trials)
    parts(CONFIGS[args.config], args.trials)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
