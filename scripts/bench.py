"""One command: this project against its peers on the same weights and data, one table of ratios.

Sections (`--only train,generate,onnx,scaling,window,quality`; default all):

  train     training tokens/s, our compiled MLX step vs Hugging Face GPT-2 in PyTorch eager and
            torch.compile (scripts/bench_train.py: nanoGPT's CPU config 4 layers/width 128/
            context 64/batch 12, and 6 layers/width 384/context 256); timed interleaved in one
            process, peak memory from each implementation alone in its own process
  generate  prompt and generation tokens/s, batch 1 and 8, ours vs mlx-lm on the same Llama-style
            weights (scripts/bench_generate.py, interleaved); peak memory from each alone
  onnx      our ONNX export (ort and portable flavours) vs torch.onnx.export of the same Hugging
            Face model in onnxruntime, and vs MLX (scripts/bench_onnx.py; a process per runner)
  scaling   training step time and peak memory as context and width grow
            (scripts/bench_scaling.py; writes docs/scaling.png)
  window    sliding window 256: training step vs context (full vs window), decode over 8x the
            window vs mlx-lm's RotatingKVCache, and the `--overflow slide` stall
            (scripts/bench_window.py)
  quality   training wall time to 1.898 nats/char on the whole validation split (nanoGPT's
            result): shakespeare_char_fast vs nanoGPT's recipe in PyTorch with its default
            threads, eager and torch.compile'd, one after the other, each stopped at the target
            (scripts/bench_quality.py; writes docs/quality.png)

Ratios are ours / peer: above 1 means ours is faster; a row whose trials vary by more than 10%
((max - min) / median, either side) says so next to its ratio. Each section's results are merged
into `runs/bench/bench.json` with the exact command, the machine, its load average, versions and
BLAS; the README's benchmark table (between `<!-- bench:start -->` and `<!-- bench:end -->`) is
regenerated from that file (scripts/bench_readme.py). `--quick` is a smoke run (tiny sizes, one
trial) that writes `runs/bench/bench-quick.json` and leaves the README alone.

    python scripts/bench.py                       # everything (about half an hour on 2 cores)
    python scripts/bench.py --only onnx --trials 5
    python scripts/bench.py --quick --only onnx
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(ROOT))

from bench_common import (  # noqa: E402
    emit,
    machine_info,
    peak_rss_mb,
    run_worker,
)
from bench_readme import END, SCALING_PNG, START, all_rows, table, update_readme  # noqa: E402

SECTIONS = ("train", "generate", "onnx", "scaling", "window", "quality")
DEFAULT_JSON = ROOT / "runs/bench/bench.json"
QUICK_JSON = ROOT / "runs/bench/bench-quick.json"


def script_json(script: str, argv: list[str], timeout: float = 3600) -> dict:
    """Run scripts/`script` with `--json` to a temporary file; its JSON, or {"error": ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        result = run_worker([str(SCRIPTS / script), *argv, "--json", str(out)], timeout)
        if out.is_file():
            return json.loads(out.read_text())
        return result if "error" in result else {"error": f"{script} wrote no JSON"}


# -- memory workers: one peer alone in a process ---------------------------------------------------


def train_memory_worker(impl: str, config: str) -> None:
    if impl == "mlx":
        from mlx_transformer.cpu.blas import ensure_fast_blas

        ensure_fast_blas()
    from bench_train import CONFIGS, mlx_runner, torch_runner

    c = CONFIGS[config]
    tic = time.perf_counter()
    if impl == "mlx":
        runner = mlx_runner(c)
    else:
        runner = torch_runner(c, compiled=impl == "torch_compile")
    runner(3)  # warm-up as in the timed runs, then a few steps
    runner(min(c["steps"], 5))
    result = {"impl": impl, "peak_rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - tic}
    if impl == "mlx":
        import mlx.core as mx

        result["mlx_peak_memory_mb"] = mx.get_peak_memory() / 2**20
    emit(result)


def generate_memory_worker(peer: str, hf_dir: str, prompt_tokens: int, new_tokens: int) -> None:
    """Batch-8 greedy generation from the HF folder, by our generator or by mlx-lm."""
    from mlx_transformer.cpu.blas import ensure_fast_blas

    ensure_fast_blas()
    import mlx.core as mx
    import numpy as np

    prompts = np.random.default_rng(1).integers(4, 8000, (8, prompt_tokens)).tolist()
    if peer == "ours":
        from mlx_transformer.checkpoint.hf import import_hf
        from mlx_transformer.generate.api import batch_generate_step

        model = import_hf(hf_dir)
        for _ in batch_generate_step(prompts, model, max_tokens=new_tokens):
            pass
    else:
        from bench_generate import TokenShim
        from mlx_lm.generate import batch_generate
        from mlx_lm.utils import load_model

        model, _ = load_model(Path(hf_dir))
        batch_generate(model, TokenShim(), prompts, max_tokens=new_tokens)
    emit(
        {
            "peer": peer,
            "peak_rss_mb": peak_rss_mb(),
            "mlx_peak_memory_mb": mx.get_peak_memory() / 2**20,
        }
    )


# -- sections --------------------------------------------------------------------------------------


def section_train(args) -> dict:
    configs = "small" if args.quick else "small,medium"
    impls = "mlx,torch_eager" if args.quick else "mlx,torch_eager,torch_compile"
    trials = 1 if args.quick else args.trials
    timing = script_json(
        "bench_train.py", ["--configs", configs, "--trials", str(trials), "--impls", impls]
    )
    memory = {}
    for config in configs.split(","):
        for impl in impls.split(","):
            argv = [__file__, "--worker", "train-memory", "--impl", impl, "--config", config]
            memory[f"{config}/{impl}"] = run_worker(argv)
    return {"timing": timing, "memory": memory}


def section_generate(args) -> dict:
    sizes = "small" if args.quick else "small,large"
    argv = ["--sizes", sizes, "--trials", str(1 if args.quick else max(args.trials // 2, 1))]
    argv += ["--batch-trials", str(1 if args.quick else max(args.trials, 3))]
    if args.quick:
        argv += ["--prompt-trials", "1", "--new-tokens", "16"]
    timing = script_json("bench_generate.py", argv)
    new_tokens = 16 if args.quick else 256
    memory = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes.split(","):
            hf_dir = write_generate_model(size, Path(tmp) / size)
            for peer in ("ours", "mlx_lm"):
                memory[f"{size}/{peer}"] = run_worker(
                    [__file__, "--worker", "generate-memory", "--peer", peer, "--hf", str(hf_dir)]
                    + ["--prompt-tokens", "128", "--new-tokens", str(new_tokens)]
                )
    return {"timing": timing, "memory": memory}


def write_generate_model(size: str, out: Path) -> Path:
    """The weights bench_generate.py uses for `size` (seed 0), as a Hugging Face folder."""
    import mlx.core as mx
    from bench_generate import LLAMA, SIZES

    from mlx_transformer.checkpoint.hf import save_hf
    from mlx_transformer.config import ModelConfig
    from mlx_transformer.model import Transformer

    mx.random.seed(0)
    model = Transformer(ModelConfig(**LLAMA, **SIZES[size]))
    mx.eval(model.parameters())
    save_hf(model, out)
    return out


def section_onnx(args) -> dict:
    import bench_onnx

    argv = ["--trials", str(args.trials), "--batch-trials", str(max(args.trials // 2, 1))]
    argv += ["--profile"] + (["--quick"] if args.quick else [])
    return bench_onnx.run(bench_onnx.parser().parse_args(argv))


def section_scaling(args) -> dict:
    plot = str(ROOT / SCALING_PNG) if not args.quick else str(QUICK_JSON.parent / "scaling.png")
    argv = ["--plot", plot, "--trials", str(1 if args.quick else 3)]
    argv += ["--window", "32" if args.quick else "256"]  # the second curve
    return script_json("bench_scaling.py", argv + (["--quick"] if args.quick else []))


def section_window(args) -> dict:
    argv = ["--trials", str(1 if args.quick else 3)] + (["--quick"] if args.quick else [])
    return script_json("bench_window.py", argv)


def section_quality(args) -> dict:
    # The row the table needs: our fast recipe against nanoGPT's in PyTorch, eager and compiled.
    argv = ["--recipes", "shakespeare_char_fast", "--torch-modes", "eager,compile"]
    argv += ["--quick"] if args.quick else ["--stop-at-target"]
    return script_json("bench_quality.py", argv, timeout=3 * 3600)


RUNNERS = {
    "train": section_train,
    "generate": section_generate,
    "onnx": section_onnx,
    "scaling": section_scaling,
    "window": section_window,
    "quality": section_quality,
}


def load_results(path: Path) -> dict:
    try:
        results = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        results = {}
    results.setdefault("sections", {})
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one trial")
    p.add_argument("--json", help=f"results file (default {DEFAULT_JSON.relative_to(ROOT)})")
    p.add_argument("--no-readme", action="store_true", help="do not touch README.md")
    p.add_argument("--worker", choices=["train-memory", "generate-memory"], help=argparse.SUPPRESS)
    for name in ("--impl", "--config", "--peer", "--hf"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--prompt-tokens", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--new-tokens", type=int, default=256, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.worker == "train-memory":
        train_memory_worker(args.impl, args.config)
        return 0
    if args.worker == "generate-memory":
        generate_memory_worker(args.peer, args.hf, args.prompt_tokens, args.new_tokens)
        return 0
    sections = [s for s in args.only.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    path = Path(args.json) if args.json else QUICK_JSON if args.quick else DEFAULT_JSON
    results = load_results(path)
    command = " ".join(["python", *sys.orig_argv[1:]]) if argv is None else f"bench.py {argv}"
    for name in sections:
        machine, tic = machine_info(), time.time()
        print(f"== {name} (load average {machine['load_average']})", file=sys.stderr, flush=True)
        try:
            data = RUNNERS[name](args)
        except Exception as e:  # keep the other sections' numbers
            data = {"error": f"{type(e).__name__}: {e}"}
        results["sections"][name] = {
            "command": command,
            "when": time.strftime("%Y-%m-%d %H:%M", time.localtime(tic)),
            "seconds": round(time.time() - tic, 1),
            "machine": machine,
            "load_average_end": machine_info()["load_average"],
            "data": data,
        }
        if "error" in data:
            print(f"  {name} failed: {data['error']}", file=sys.stderr)
        end = results["sections"][name]["load_average_end"]
        print(f"   {name} done (load average {end})", file=sys.stderr, flush=True)
    results["rows"] = all_rows(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results["rows"]))
    scaling = results["sections"].get("scaling", {}).get("data")
    if scaling and "summary" in scaling:
        print("\nscaling: " + scaling["summary"])
    if not args.quick and not args.no_readme and not update_readme(results):
        print(f"README.md has no {START} … {END} markers; table not written", file=sys.stderr)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
