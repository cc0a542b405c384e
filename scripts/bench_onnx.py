"""ONNX Runtime generation speed: our export (both flavours) vs torch.onnx.export of the same model.

One run, the same random weights everywhere. For each family (GPT-2, Llama) and size, our
`Transformer` is saved as a checkpoint, exported with `export_onnx` (flavours `portable` and
`ort`), and written as a Hugging Face folder (`save_hf`) that transformers loads and
`torch.onnx.export` turns into a graph with our IO convention (input_ids, attention_mask,
position_ids, past_key_values.{i}.key/value → logits, present.{i}.key/value). Runners:

  mlx            our MLX generation (`batch_generate_step`, compiled static-cache decode)
  onnx-portable  our export, opset 17 only, onnxruntime CPU EP
  onnx-ort       our export, com.microsoft fused ops (GroupQueryAttention, SkipLayerNorm, ...)
  torch-onnx     transformers model → torch.onnx.export (TorchScript exporter, opset 17)

The three ONNX graphs run through the same code: `export.runtime.OnnxGenerator` (same session
options, same numpy greedy loop); the torch graph gets an io.json so the runtime can load it.
The generator asks for a prompt's last logits only: our graphs take `num_logits_to_keep` and skip
the LM head at the other positions; the torch graph has no such input (neither has optimum's
export, which fixes logits_to_keep at 0) and computes them all. scripts/bench_onnx_prefill.py
times prompts alone, both ways, alternating in one process.
Each runner runs in its own process so its peak RSS is its own. Greedy decoding, no EOS:
prompt tok/s = batch * prompt tokens / time to the first token; generation tok/s =
batch * (new tokens - 1) / time from the first token to the last. Medians over trials.
`--profile` adds onnxruntime's per-op profile of one batch-1 generation per ONNX runner.
The torch export is in scripts/bench_torch_onnx.py, the worker (one runner, one process) in
scripts/bench_onnx_worker.py; this file prepares the models, runs the workers and compares.

    python scripts/bench_onnx.py [--families gpt2,llama] [--sizes small] [--trials 5]
        [--json runs/bench/onnx.json] [--profile] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import (  # noqa: E402
    fmt,
    fmt_ratio,
    machine_info,
    markdown_table,
    ratio,
    run_worker,
)
from bench_onnx_worker import worker  # noqa: E402
from bench_torch_onnx import export_torch_onnx, torch_export_parity  # noqa: E402

RUNNERS = ("mlx", "onnx-portable", "onnx-ort", "torch-onnx")
ONNX_RUNNERS = ("onnx-portable", "onnx-ort", "torch-onnx")
BASE = dict(vocab_size=8000, max_position_embeddings=512)
FAMILIES = {
    "gpt2": dict(position_encoding="learned", norm_type="layernorm", hidden_act="gelu_tanh"),
    "llama": dict(
        position_encoding="rope",
        norm_type="rmsnorm",
        hidden_act="swiglu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
    ),
}
SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8),
    "large": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
}
# Llama-style sizes as in scripts/bench_generate.py (GQA: 4 key/value heads).
LLAMA_EXTRA = {
    "tiny": dict(num_key_value_heads=2, intermediate_size=128),
    "small": dict(num_key_value_heads=4, intermediate_size=768),
    "large": dict(num_key_value_heads=4, intermediate_size=2048),
}
GOAL_ORT_VS_TORCH = 1.3
GOAL_ONNX_VS_MLX = 1.0


def model_config(family: str, size: str) -> dict:
    extra = LLAMA_EXTRA[size] if family == "llama" else {}
    return {**BASE, **FAMILIES[family], **SIZES[size], **extra}


# -- preparing the artifacts (parent process) ------------------------------------------------------


def prepare(family: str, size: str, workdir: Path, seed: int = 0) -> dict:
    """Checkpoint, both ONNX flavours, HF folder and torch export of one random model.

    Returns {"config", "paths", "parity"}: parity = max |logit diff| against MLX on one prompt
    for each ONNX graph, and of the torch graph against transformers.
    """
    import mlx.core as mx
    import numpy as np
    from transformers.utils import logging as hf_logging

    from export.exporter import export_onnx
    from export.session import OnnxModel
    from mlx_transformer.checkpoint.hf import save_hf
    from mlx_transformer.checkpoint.mlx_io import save_checkpoint
    from mlx_transformer.config import ModelConfig
    from mlx_transformer.model import Transformer

    hf_logging.set_verbosity_error()  # GPT-2's default bos/eos ids lie outside a small vocab
    hf_logging.disable_progress_bar()
    config = model_config(family, size)
    root = workdir / f"{family}-{size}"
    paths = {name: root / name for name in ("ckpt", "hf", *ONNX_RUNNERS)}
    mx.random.seed(seed)
    model = Transformer(ModelConfig(**config))
    model.eval()
    mx.eval(model.parameters())
    save_checkpoint(paths["ckpt"], model)
    save_hf(model, paths["hf"], overwrite=True)  # --workdir may hold an earlier run's
    for flavour in ("portable", "ort"):
        onnx_dir = paths[f"onnx-{flavour}"]
        export_onnx(paths["ckpt"], onnx_dir, flavour=flavour, measure=False, overwrite=True)
    torch_io = export_torch_onnx(paths["hf"], paths["torch-onnx"])

    probe = np.random.default_rng(seed).integers(0, config["vocab_size"], (1, 32))
    reference = np.array(model(mx.array(probe)))
    parity = {}
    for name in ONNX_RUNNERS:
        logits, _ = OnnxModel(paths[name])(probe, np.ones_like(probe))
        parity[f"{name}_vs_mlx"] = float(np.abs(logits - reference).max())
    parity["torch-onnx_vs_transformers"] = torch_export_parity(paths["hf"], paths["torch-onnx"])
    return {
        "config": config,
        "torch_export": torch_io,
        "paths": {k: str(v) for k, v in paths.items()},
        "parity": parity,
    }


# -- the parent: prepare, run the workers, compare -----------------------------------------------


def run_runner(runner: str, prepared: dict, args: argparse.Namespace) -> dict:
    options = {
        "--worker": runner,
        "--paths": json.dumps(prepared["paths"]),
        "--vocab": prepared["config"]["vocab_size"],
        "--prompt-tokens": args.prompt_tokens,
        "--new-tokens": args.new_tokens,
        "--trials": args.trials,
        "--batch-trials": args.batch_trials,
        "--seed": args.seed,
    }
    argv = [str(Path(__file__).resolve())] + [str(x) for kv in options.items() for x in kv]
    if args.profile:
        argv.append("--profile")
    return run_worker(argv)


def compare(runs: dict[str, dict]) -> dict:
    """Ratios of every runner against every other, per batch and metric (row / column)."""
    out = {}
    for a, b in itertools.permutations(runs, 2):
        if "error" in runs[a] or "error" in runs[b]:
            continue
        for batch in ("batch1", "batch8"):
            for metric in ("prompt_tps", "generation_tps"):
                key = f"{a}/{b}"
                out.setdefault(key, {})[f"{batch}.{metric}"] = ratio(
                    runs[a][batch][metric], runs[b][batch][metric]
                )
    return out


def goals(models: dict) -> dict:
    """The two speed goals of the ONNX export, per model and batch size (generation tok/s)."""
    out = {}
    for name, m in models.items():
        r = m.get("ratios", {})
        for batch in ("batch1", "batch8"):
            key = f"{batch}.generation_tps"
            vs_torch = r.get("onnx-ort/torch-onnx", {}).get(key)
            vs_mlx = {f: r.get(f"{f}/mlx", {}).get(key) for f in ("onnx-portable", "onnx-ort")}
            out[f"{name}.{batch}"] = {
                "ort_vs_torch_onnx": vs_torch,
                "ort_vs_torch_onnx_met": vs_torch is not None and vs_torch >= GOAL_ORT_VS_TORCH,
                "onnx_vs_mlx": vs_mlx,
                "onnx_ort_vs_mlx_met": (vs_mlx["onnx-ort"] or 0) >= GOAL_ONNX_VS_MLX,
            }
    return out


def bench(args: argparse.Namespace, workdir: Path) -> dict:
    results = {
        "command": " ".join(sys.orig_argv),
        "machine": machine_info(),
        "settings": {
            k: getattr(args, k)
            for k in ("prompt_tokens", "new_tokens", "trials", "batch_trials", "seed")
        },
        "models": {},
    }
    for family, size in itertools.product(args.families.split(","), args.sizes.split(",")):
        name = f"{family}-{size}"
        print(f"{name}: preparing", file=sys.stderr, flush=True)
        prepared = prepare(family, size, workdir, args.seed)
        runs = {}
        for runner in args.runners.split(","):
            print(f"{name}: {runner}", file=sys.stderr, flush=True)
            runs[runner] = run_runner(runner, prepared, args)
            if "error" in runs[runner]:
                print(f"  failed: {runs[runner]['error']}", file=sys.stderr)
        reference = runs.get("mlx", {}).get("tokens_batch1")
        for r in runs.values():
            if reference and "tokens_batch1" in r:
                same = sum(a == b for a, b in zip(r["tokens_batch1"], reference))
                r["greedy_agreement_with_mlx"] = same / len(reference)
        prepared.pop("paths")
        results["models"][name] = {**prepared, "runners": runs, "ratios": compare(runs)}
    results["goals"] = goals(results["models"])
    results["machine"]["load_average_end"] = machine_info()["load_average"]
    return results


def table(results: dict) -> str:
    """One row per model, batch and runner: tok/s, ratios to torch-onnx and to MLX, peak RSS."""
    rows = []
    for name, m in results["models"].items():
        runs = m["runners"]
        for batch in ("batch1", "batch8"):
            for runner, r in runs.items():
                if "error" in r:
                    rows.append([name, batch[5:], runner, "failed", "", "", "", "", "", ""])
                    continue
                cells = [name, batch[5:], runner]
                for metric in ("prompt_tps", "generation_tps"):
                    value = r[batch][metric]
                    cells.append(fmt(value))
                    for peer in ("torch-onnx", "mlx"):
                        base = runs.get(peer, {}).get(batch, {}).get(metric)
                        cells.append(fmt_ratio(ratio(value, base)))
                cells.append(fmt(r["peak_rss_mb"], 0))
                rows.append(cells)
    headers = ["model", "batch", "runner", "prompt tok/s", "vs torch-onnx", "vs mlx"]
    headers += ["gen tok/s", "vs torch-onnx", "vs mlx", "peak RSS MiB"]
    return markdown_table(headers, rows)


def profile_table(results: dict, top: int = 6) -> str:
    rows = []
    for name, m in results["models"].items():
        for runner, r in m["runners"].items():
            p = r.get("profile")
            if not p:
                continue
            ops = ", ".join(
                f"{op} {v['share']:.0%}" for op, v in itertools.islice(p["ops"].items(), top)
            )
            per_run = p["run_ms"] / max(p["runs"], 1)
            share = p["outside_kernels_share"]
            rows.append([name, runner, f"{per_run:.2f}", f"{share:.0%}" if share else "-", ops])
    headers = ["model", "runner", "ms/run (b1)", "outside kernels", "kernel time by op"]
    return markdown_table(headers, rows) if rows else ""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="gpt2,llama")
    p.add_argument("--sizes", default="small", help=f"of {', '.join(SIZES)}")
    p.add_argument("--runners", default=",".join(RUNNERS))
    p.add_argument("--trials", type=int, default=5, help="batch-1 trials per runner")
    p.add_argument("--batch-trials", type=int, default=3, help="batch-8 trials per runner")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="onnxruntime per-op profile")
    p.add_argument("--quick", action="store_true", help="tiny model, few tokens: a smoke run")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--workdir", help="keep the exported models here (default: a temp folder)")
    p.add_argument("--worker", choices=RUNNERS, help=argparse.SUPPRESS)
    p.add_argument("--paths", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    return p


def apply_quick(args: argparse.Namespace) -> None:
    args.sizes, args.trials, args.batch_trials = "tiny", 1, 1
    args.prompt_tokens, args.new_tokens = 16, 8


def run(args: argparse.Namespace) -> dict:
    """Everything but printing: the results dict (also written to --json)."""
    if args.quick:
        apply_quick(args)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        results = bench(args, workdir)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    results = run(args)
    print(table(results))
    prof = profile_table(results)
    if prof:
        print("\n" + prof)
    for key, g in results["goals"].items():
        vs_mlx = g["onnx_vs_mlx"]
        print(f"{key}: ort/torch-onnx {fmt_ratio(g['ort_vs_torch_onnx'])} "
              f"(goal {GOAL_ORT_VS_TORCH}x), onnx-ort/mlx {fmt_ratio(vs_mlx['onnx-ort'])}, "
              f"onnx-portable/mlx {fmt_ratio(vs_mlx['onnx-portable'])}")  # fmt: skip
    print(f"load average: {results['machine']['load_average']} → "
          f"{results['machine']['load_average_end']}", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
