"""`mlx-transformer demo`: the whole journey on the embedded Tiny Shakespeare, in one command.

    prepare → train → generate → export (portable + ort) → verify on every execution provider
    → generate with onnxruntime and no MLX → inspect → runs/<name>/report.md

Training follows the shipped recipe train/recipes/shakespeare_char.json (nanoGPT's CPU
Shakespeare-char settings) on a sentencepiece char tokenizer: a few minutes on 2 CPU cores,
faster on a Mac.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from .errors import UserError

PROMPT = "ROMEO:\n"
# The model's context is 64 characters: longer samples slide the window (the same policy in MLX
# and onnxruntime). Greedy text must match across runtimes; sampled text uses each runtime's RNG.
SAMPLE = dict(max_tokens=300, temp=0.8, top_k=40, seed=7, overflow="slide")
GREEDY = dict(max_tokens=120, overflow="slide")
RECIPE = "shakespeare_char.json"  # in train/recipes/
QUICK = dict(  # replaces the recipe's keys for a minute-long smoke run
    max_steps=60,
    eval_every=30,
    eval_batches=4,
    save_every=30,
    model=dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        hidden_act="gelu_tanh",
    ),
)

# Runs in a fresh interpreter in which `import mlx` fails: the deployment path needs no MLX.
NO_MLX_GENERATE = textwrap.dedent("""
    import json, sys
    class NoMLX:
        def find_spec(self, name, path=None, target=None):
            if name == "mlx" or name.startswith("mlx."):
                raise ImportError("mlx is blocked: the ONNX runtime must not need it")
    sys.meta_path.insert(0, NoMLX())
    from export.runtime import OnnxGenerator
    onnx_dir, prompt, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    generator = OnnxGenerator(onnx_dir)
    texts = [generator.generate(prompt, **settings)[0].text for settings in runs]
    print(json.dumps({"texts": texts, "mlx_loaded": "mlx" in sys.modules}))
""")


def stage(n: int, total: int, title: str) -> float:
    print(f"\n== [{n}/{total}] {title}", flush=True)
    return time.perf_counter()


def run_demo(out: str | Path, quick: bool = False, steps: int | None = None) -> dict:
    """Run every stage into `out`; returns the figures written to report.json / report.md."""
    from export import export_onnx

    from .checkpoint.mlx_io import load_checkpoint
    from .data.prepare import prepare
    from .generate.api import generate
    from .generate.sample import make_sampler
    from .interpret.report import inspect_model
    from .tokenizer import Tokenizer
    from .train.args import RECIPES, TrainingArgs, read_config_file
    from .train.trainer import evaluate_checkpoint, train
    from .verify import verify

    out, figures, total = Path(out), {}, 8
    t = stage(1, total, "prepare: char tokenizer + token shards from the embedded Tiny Shakespeare")
    manifest = prepare(None, out / "data", model_type="char", verbose=True)
    figures["data"] = {k: manifest["splits"][k]["tokens"] for k in ("train", "val")}
    figures["seconds"] = {"prepare": time.perf_counter() - t}

    t = stage(2, total, "train: nanoGPT's CPU Shakespeare-char recipe")
    recipe = {**read_config_file(RECIPES / RECIPE), **(QUICK if quick else {})}
    if steps is not None:
        recipe["max_steps"] = steps
    args = TrainingArgs(data=str(out / "data"), out=str(out / "train"), **recipe)
    result = train(args)
    if result.stopped_by != "completed":
        raise SystemExit(result.exit_code)  # the checkpoint is saved; the demo stops here
    ckpt = result.checkpoint
    metrics = [json.loads(line) for line in (out / "train/metrics.jsonl").read_text().splitlines()]
    speeds = [m["tokens_per_sec"] for m in metrics if "tokens_per_sec" in m]
    whole_val = evaluate_checkpoint(ckpt, out / "data")  # every validation token, not a sample
    print(
        f"  whole validation split: {whole_val['val_loss']:.4f} nats/token, "
        f"{whole_val['val_bpb']:.3f} bits/byte"
    )
    figures["train"] = {
        "steps": result.step,
        "val": whole_val,
        "train_loss": result.train_loss,
        "tokens_per_s": speeds[-1] if speeds else None,
        "checkpoint": str(ckpt),
    }
    figures["seconds"]["train"] = time.perf_counter() - t

    t = stage(3, total, f"generate with MLX from {PROMPT!r}")
    model, tokenizer = load_checkpoint(ckpt), Tokenizer.load(ckpt)
    sampler = make_sampler(SAMPLE["temp"], top_k=SAMPLE["top_k"], seed=SAMPLE["seed"])
    settings = {k: v for k, v in SAMPLE.items() if k in ("max_tokens", "overflow")}
    mlx_text = generate(model, tokenizer, PROMPT, sampler=sampler, **settings)
    mlx_greedy = generate(model, tokenizer, PROMPT, **GREEDY)
    print(PROMPT + mlx_text)
    figures["seconds"]["generate"] = time.perf_counter() - t

    t = stage(4, total, "export to ONNX: portable (standard ops) and ort (onnxruntime fused ops)")
    exports = {}
    for flavour in ("portable", "ort"):
        info = export_onnx(ckpt, out / f"onnx-{flavour}", flavour=flavour)
        exports[flavour] = info.get("size_bytes")
        print(f"  onnx-{flavour}/model.onnx: {exports[flavour] / 1e6:.2f} MB")
    figures["seconds"]["export"] = time.perf_counter() - t

    t = stage(5, total, "verify each export against MLX on every execution provider present")
    figures["verify"] = {}
    for flavour in ("portable", "ort"):
        report = verify(ckpt, out / f"onnx-{flavour}")
        figures["verify"][flavour] = summarize_verify(report)
        print(
            f"  {flavour}: {'PASS' if report['ok'] else 'FAIL'} "
            f"({', '.join(report['providers'])}) — onnx-{flavour}/verify.md"
        )
    figures["seconds"]["verify"] = time.perf_counter() - t

    t = stage(6, total, "generate with onnxruntime in a process where MLX cannot be imported")
    runs = json.dumps([SAMPLE, GREEDY])
    proc = subprocess.run(
        [sys.executable, "-c", NO_MLX_GENERATE, str(out / "onnx-ort"), PROMPT, runs],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if proc.returncode:
        raise RuntimeError(f"ONNX generation failed:\n{proc.stderr}")
    onnx_text, onnx_greedy = json.loads(proc.stdout.strip().splitlines()[-1])["texts"]
    print(PROMPT + onnx_text)
    figures["generate"] = {
        "mlx": mlx_text,
        "onnx": onnx_text,
        "greedy": mlx_greedy,
        "greedy_equal": onnx_greedy == mlx_greedy,
    }
    print(
        f"  greedy text identical to MLX's ({len(mlx_greedy)} characters): "
        f"{figures['generate']['greedy_equal']}"
    )
    figures["seconds"]["onnx_generate"] = time.perf_counter() - t

    t = stage(7, total, "inspect: attention maps, logit lens, ablations, head scores")
    prompt = "ROMEO:\nBut soft, what light through yonder window breaks?"
    figures["inspect"] = inspect_model(model, tokenizer, prompt[:63], out / "inspect")["heads"]
    figures["seconds"]["inspect"] = time.perf_counter() - t

    stage(8, total, "report")
    (out / "report.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    (out / "report.md").write_text(report_markdown(figures, exports))
    print(f"  {out / 'report.md'}")
    return figures


def summarize_verify(report: dict) -> dict:
    """Per provider: pass/fail, worst logit error, greedy agreement, and where the graph ran."""
    rows = {}
    for row in report["checks"]:
        p = rows.setdefault(row["provider"], {"ok": True, "max_abs_error": 0.0})
        p["ok"] = p["ok"] and row["ok"] is not False
        if isinstance(row.get("max_abs_error"), float):
            p["max_abs_error"] = max(p["max_abs_error"], row["max_abs_error"])
        for key in ("greedy_match", "status"):
            if key in row:
                p[key] = row[key]
    return rows


def report_markdown(f: dict, exports: dict) -> str:
    val = f["train"]["val"]
    lines = [
        "# mlx-transformer demo",
        "",
        f"Data: {f['data']['train']:,} train / {f['data']['val']:,} validation tokens "
        "(Tiny Shakespeare, char tokenizer).",
        "",
        f"Training: {f['train']['steps']} steps; on the whole validation split, loss "
        f"**{val['val_loss']:.4f}** nats/token, **{val['val_bpb']:.3f}** bits per byte, "
        f"perplexity {val['val_ppl']:.2f}; "
        f"{(f['train']['tokens_per_s'] or 0):,.0f} tokens/s. "
        "[metrics](train/metrics.jsonl)",
        "",
        "![loss curve](train/loss.png)",
        "",
        "## ONNX parity with MLX, per execution provider",
        "",
        "| flavour | provider | ran on it | max abs logit error | greedy tokens | ok |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for flavour, providers in f["verify"].items():
        for name, p in providers.items():
            if name in ("-", "", None):
                continue
            lines.append(
                f"| {flavour} ({exports[flavour] / 1e6:.2f} MB) | {name} | "
                f"{p.get('status', '')} | {p['max_abs_error']:.2e} | "
                f"{p.get('greedy_match', '')} | {'yes' if p['ok'] else '**NO**'} |"
            )
    lines += ["", "Reports: [portable](onnx-portable/verify.md), [ort](onnx-ort/verify.md).", ""]
    g = f["generate"]
    same = "identical" if g["greedy_equal"] else "**different**"
    lines += [
        "## Samples",
        "",
        "MLX (temperature 0.8, top-k 40):",
        "",
        "```",
        PROMPT + g["mlx"],
        "```",
        "",
        "onnxruntime, in a process where MLX cannot be imported (same settings; numpy's RNG):",
        "",
        "```",
        PROMPT + g["onnx"],
        "```",
        "",
        f"Greedy decoding ({len(g['greedy'])} characters): MLX and onnxruntime give {same} text.",
        "",
    ]
    lines += [
        "## Inside the model",
        "",
        "![attention](inspect/attention.png)",
        "",
        "![logit lens](inspect/logit_lens.png)",
        "",
        "![ablation](inspect/ablation.png)",
        "",
    ]
    lines += [
        "## Time per stage (s)",
        "",
        "| " + " | ".join(f["seconds"]) + " |",
        "|" + " --- |" * len(f["seconds"]),
        "| " + " | ".join(f"{s:.1f}" for s in f["seconds"].values()) + " |",
        "",
    ]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--out", help="run folder, which must not exist yet (default: runs/demo-<date>-<time>)"
    )
    parser.add_argument("--steps", type=int, help="training steps (default: 2000)")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny model for a minute-long smoke run"
    )


def run(args) -> int:
    tic = time.perf_counter()
    out = Path(args.out or time.strftime("runs/demo-%Y%m%d-%H%M%S"))
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists; choose another --out (nothing was overwritten)")
    run_demo(out, quick=args.quick, steps=args.steps)
    print(f"\ndemo finished in {time.perf_counter() - tic:.0f} s")
    return 0
