"""The worker side of scripts/bench_onnx.py: one runner, one process.

`bench_onnx.py --worker RUNNER` loads one model (MLX checkpoint or ONNX graph), times greedy
generation at batch 1 and batch 8, optionally profiles onnxruntime, and prints one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from bench_common import current_rss_mb, emit, peak_rss_mb, summarize


def onnx_generator(onnx_dir: str):
    """(generate(prompts, n) → iterator of (B,) tokens, the generator object)."""
    from export.runtime import OnnxGenerator

    gen = OnnxGenerator(onnx_dir, provider="cpu")

    def generate(prompts, n):
        return itertools.islice(gen.generate_step(prompts), n)

    return generate, gen


def mlx_generator(ckpt: str):
    from mlx_transformer.checkpoint.mlx_io import load_checkpoint
    from mlx_transformer.generate.api import batch_generate_step

    model = load_checkpoint(ckpt)
    model.eval()

    def generate(prompts, n):
        return batch_generate_step(prompts, model, max_tokens=n)

    return generate, model


def time_steps(steps) -> tuple[float, float, list]:
    """(seconds to the first step, seconds from the first step to the last, the steps)."""
    tic = time.perf_counter()
    out, first = [], None
    for step in steps:
        if first is None:
            first = time.perf_counter()
        out.append([int(t) for t in step])
    return first - tic, time.perf_counter() - first, out


def rates(generate, prompts, new_tokens) -> tuple[dict, list]:
    ttft, rest, steps = time_steps(generate(prompts, new_tokens))
    B, P = len(prompts), len(prompts[0])
    rate = {"prompt_tps": B * P / ttft, "generation_tps": B * (new_tokens - 1) / max(rest, 1e-9)}
    return rate, steps


def measure(generate, prompts, new_tokens: int, trials: int, batch_trials: int) -> dict:
    """Warm up once per batch size, then time batch 1 and batch 8 (all prompts)."""
    rates(generate, prompts[:1], new_tokens)  # warm-up: allocator, kernels, compiled steps
    rates(generate, prompts, new_tokens)
    one = [rates(generate, prompts[:1], new_tokens) for _ in range(trials)]
    many = [rates(generate, prompts, new_tokens) for _ in range(batch_trials)]
    return {
        "batch1": summarize([r for r, _ in one]),
        "batch8": summarize([r for r, _ in many]),
        "trials": {"batch1": [r for r, _ in one], "batch8": [r for r, _ in many]},
        "tokens_batch1": [s[0] for s in one[0][1]],
    }


def profile_onnx(gen, prompt: list[int], new_tokens: int, out_dir: Path) -> dict:
    """onnxruntime's profile of one generation: time per op type, and time outside kernels."""
    from export.providers import create_session, session_options

    so = session_options()
    so.enable_profiling = True
    so.profile_file_prefix = str(out_dir / "ort_profile")
    model = gen.model
    model.session, _ = create_session(model.dir / model.io["model"], "cpu", options=so)
    list(itertools.islice(gen.generate_step([prompt]), new_tokens))
    path = model.session.end_profiling()
    return summarize_profile(json.loads(Path(path).read_text()))


def summarize_profile(events: list[dict]) -> dict:
    """Per-op-type kernel time (ms, share) and run time vs kernel time over all model runs."""
    by_op: dict[str, float] = {}
    runs, kernel_us, run_us = 0, 0.0, 0.0
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"]
            kernel_us += e["dur"]
        elif e.get("cat") == "Session" and e.get("name") == "model_run":
            runs += 1
            run_us += e["dur"]
    top = sorted(by_op.items(), key=lambda kv: -kv[1])
    return {
        "runs": runs,
        "run_ms": run_us / 1e3,
        "kernel_ms": kernel_us / 1e3,
        "outside_kernels_share": 1 - kernel_us / run_us if run_us else None,
        "ops": {op: {"ms": us / 1e3, "share": us / kernel_us} for op, us in top[:12]},
    }


def worker(args: argparse.Namespace) -> None:
    import numpy as np

    if args.worker == "mlx":
        from mlx_transformer.cpu import blas

        blas.ensure_fast_blas()  # re-executes this worker with OpenBLAS preloaded, where found
    paths = json.loads(args.paths)
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(4, args.vocab, (8, args.prompt_tokens)).tolist()
    rss_start = current_rss_mb()
    tic = time.perf_counter()
    if args.worker == "mlx":
        generate, handle = mlx_generator(paths["ckpt"])
    else:
        generate, handle = onnx_generator(paths[args.worker])
    result = {"runner": args.worker, "load_s": time.perf_counter() - tic}
    result["rss_loaded_mb"] = current_rss_mb()
    result.update(measure(generate, prompts, args.new_tokens, args.trials, args.batch_trials))
    result["rss_start_mb"], result["peak_rss_mb"] = rss_start, peak_rss_mb()
    if args.worker == "mlx":
        import mlx.core as mx

        from mlx_transformer.cpu.blas import blas_info

        result["mlx_peak_memory_mb"] = mx.get_peak_memory() / 2**20
        result["blas"] = blas_info()
    else:
        so = handle.model.session.get_session_options()
        result["ort"] = {
            "intra_op_num_threads": so.intra_op_num_threads,  # 0 = one per physical core
            "graph_optimization_level": str(so.graph_optimization_level),
        }
        if args.profile:
            out = Path(paths["ckpt"]).parent / f"profile-{args.worker}"
            out.mkdir(exist_ok=True)
            result["profile"] = profile_onnx(handle, prompts[0], args.new_tokens, out)
    emit(result)
