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
Each runner runs in its own process so its peak RSS is its own. Greedy decoding, no EOS:
prompt tok/s = batch * prompt tokens / time to the first token; generation tok/s =
batch * (new tokens - 1) / time from the first token to the last. Medians over trials.
`--profile` adds onnxruntime's per-op profile of one batch-1 generation per ONNX runner.

    python scripts/bench_onnx.py [--families gpt2,llama] [--sizes small] [--trials 5]
        [--json runs/bench/onnx.json] [--profile] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import (  # noqa: E402
    current_rss_mb,
    emit,
    fmt,
    fmt_ratio,
    machine_info,
    markdown_table,
    peak_rss_mb,
    ratio,
    run_worker,
    summarize,
)

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


# -- torch.onnx.export of the Hugging Face model ---------------------------------------------------


def past_key_values_wrapper(model):
    """A torch module with our flat IO around a transformers causal LM.

    The padding mask (B, S) becomes a 4D additive mask here, in traced tensor ops: transformers'
    own mask code branches on Python ints (sizes, "is the mask all ones"), which the TorchScript
    tracer freezes at the example's shapes. Same rule as ours: causal, no padded keys, and each
    query sees itself (so a padded row is never fully masked).
    """
    import torch
    from transformers import DynamicCache

    class PastKeyValues(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            S, L = attention_mask.shape[1], input_ids.shape[1]
            k = torch.arange(S)[None, :]  # (1, S)
            q = k[:, S - L :].transpose(0, 1)  # (L, 1): positions of the queries
            keep = ((k <= q)[None] & attention_mask[:, None, :].bool()) | (k == q)[None]
            bias = torch.where(keep, 0.0, torch.finfo(torch.float32).min)[:, None]  # (B,1,L,S)
            cache = DynamicCache(list(zip(past[0::2], past[1::2])))
            out = self.model(
                input_ids=input_ids,
                attention_mask=bias,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            present = [
                t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)
            ]
            return (out.logits, *present)

    return PastKeyValues().eval()  # eval: export restores the wrapper's mode on the model


def hf_dims(hf_config) -> tuple[int, int, int, int]:
    """(layers, key/value heads, head size, context) of a transformers GPT-2 or Llama config."""
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return hf_config.num_hidden_layers, kv_heads, head_dim, hf_config.max_position_embeddings


def export_torch_onnx(hf_dir: str | Path, out_dir: str | Path, opset: int = 17) -> dict:
    """transformers model in `hf_dir` → `out_dir`/model.onnx + io.json (OnnxGenerator loads it).

    Returns:
        The io.json written, with the export time.
    """
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    n_layers, kv_heads, head_dim, context = hf_dims(model.config)
    past_names = [f"past_key_values.{i}.{k}" for i in range(n_layers) for k in ("key", "value")]
    present_names = [f"present.{i}.{k}" for i in range(n_layers) for k in ("key", "value")]
    dynamic = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total_seq"},
        "position_ids": {0: "batch", 1: "seq"},
        "logits": {0: "batch", 1: "seq"},
        **{n: {0: "batch", 2: "past_seq"} for n in past_names},
        **{n: {0: "batch", 2: "total_seq"} for n in present_names},
    }
    B, L, P = 2, 3, 4  # example shapes: all different, so no dynamic axis is confused with another
    example = (
        torch.randint(0, model.config.vocab_size, (B, L)),
        torch.ones(B, P + L, dtype=torch.long),
        torch.arange(P, P + L)[None].repeat(B, 1),
        *[torch.zeros(B, kv_heads, P, head_dim) for _ in past_names],
    )
    tic = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about the frozen branches we bypass
        torch.onnx.export(
            past_key_values_wrapper(model),
            example,
            str(out_dir / "model.onnx"),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,  # the dynamo exporter needs onnxscript, which is not installed
        )
    io = {
        "format": "torch.onnx.export",
        "model": "model.onnx",
        "flavour": "torch",
        "exporter": f"torch {torch.__version__} TorchScript, opset {opset}",
        "attn_implementation": model.config._attn_implementation,
        "num_hidden_layers": n_layers,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "context_length": context,
        "vocab_size": model.config.vocab_size,
        "special_tokens": None,
        "export_seconds": round(time.perf_counter() - tic, 2),
    }
    (out_dir / "io.json").write_text(json.dumps(io, indent=2) + "\n")
    return io


def torch_export_parity(hf_dir: str | Path, onnx_dir: str | Path, seed: int = 0) -> float:
    """Max |logit difference| of the torch-exported graph vs transformers itself.

    A left-padded batch of two: a prefill, then one decode step fed the graph's own cache.
    """
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from export.runtime import OnnxModel, positions_from_mask

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    onnx_model = OnnxModel(onnx_dir)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, model.config.vocab_size, (2, 9))
    mask = np.ones((2, 9), np.int64)
    mask[1, :3] = 0  # row 1 is left-padded
    logits, past = onnx_model(ids[:, :-1], mask[:, :-1])
    step, _ = onnx_model(ids[:, -1:], mask, past)
    ours = np.concatenate([logits, step], axis=1)
    with torch.no_grad():
        ref = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions_from_mask(mask, 9)),
        ).logits.numpy()
    real = mask.astype(bool)  # padded positions' logits mean nothing
    return float(np.abs(ours - ref)[real].max())


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
    from export.runtime import OnnxModel
    from mlx_transformer.checkpoint import save_checkpoint
    from mlx_transformer.config import ModelConfig
    from mlx_transformer.hf import save_hf
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
    save_hf(model, paths["hf"])
    for flavour in ("portable", "ort"):
        export_onnx(paths["ckpt"], paths[f"onnx-{flavour}"], flavour=flavour, measure=False)
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


# -- the worker: one runner, one process -----------------------------------------------------------


def onnx_generator(onnx_dir: str):
    """(generate(prompts, n) → iterator of (B,) tokens, the generator object)."""
    from export.runtime import OnnxGenerator

    gen = OnnxGenerator(onnx_dir, provider="cpu")

    def generate(prompts, n):
        return itertools.islice(gen.generate_step(prompts), n)

    return generate, gen


def mlx_generator(ckpt: str):
    from mlx_transformer.checkpoint import load_checkpoint
    from mlx_transformer.generate import batch_generate_step

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
        from mlx_transformer import blas

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

        from mlx_transformer.blas import blas_info

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
    """The two goals of issue 6, per model and batch size (generation tok/s)."""
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
