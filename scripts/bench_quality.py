"""Time to quality: training wall time until the loss on the whole validation split reaches a
target (default 1.898 nats/char, nanoGPT's result with its CPU Shakespeare-char recipe).

Each run trains on the same prepared data (runs/data/shakespeare_char, made by `prepare` when
missing: the embedded Tiny Shakespeare, a char tokenizer) and evaluates every val token every
`--every` steps. Evaluation time is kept apart: the time to target is training wall time only
(the first step's compilation included), read two ways: at the first checkpoint whose loss is
at or below the target, and interpolated linearly between that checkpoint and the one before.

  ours    `mlx-transformer train`'s loop (Trainer.train_step) with a shipped recipe or a config
          file: by default nanoGPT's (shakespeare_char) and ours (shakespeare_char_fast)
  torch   nanoGPT's recipe in PyTorch on nanoGPT's model (scripts/bench_train.py's GPT-2):
          the same batches, schedule (warmup, cosine to 1e-4), AdamW, clipping and evaluation;
          torch's default threads, eager as nanoGPT's CPU recipe runs (--torch-modes eager,compile:
          also torch.compile'd, a second run)

The runs go one after the other in this process (PyTorch's threads slow down badly when other
work shares the cores, so nothing here runs concurrently); the load average is printed around
each. Ratios are the other run's time over the run's: above 1 means the run is faster.

    python scripts/bench_quality.py                                # both recipes and torch
    python scripts/bench_quality.py --recipes shakespeare_char_fast --no-torch \\
        --set learning_rate=3e-3 --set model.norm_type=rmsnorm     # a recipe experiment
    python scripts/bench_quality.py --quick                        # smoke run, under a minute
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(ROOT))

from bench_quality_report import TORCH, Curve, plot, ratio_rows, report  # noqa: E402

from mlx_transformer.cpu.blas import ensure_fast_blas  # noqa: E402  (must run before mlx loads)

TARGET = 1.898  # nats/char: nanoGPT's val loss with its CPU Shakespeare-char recipe
DATA = ROOT / "runs/data/shakespeare_char"
PLOT = ROOT / "docs/quality.png"


def ensure_data(path: Path) -> None:
    """The data scripts/train_shakespeare_char.sh trains on, prepared when missing."""
    if (path / "manifest.json").is_file():
        return
    cmd = [sys.executable, "-m", "mlx_transformer", "prepare", "--model-type", "char"]
    subprocess.run(cmd + ["--vocab-size", "330", "--out", str(path)], check=True, cwd=ROOT)


def parse_sets(items: list[str]) -> dict:
    """--set KEY=VALUE (JSON values; model.FIELD for ModelConfig fields) as a settings dict."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item}: expected KEY=VALUE")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        key = key.replace("-", "_")
        if key.startswith("model."):
            out.setdefault("model", {})[key.removeprefix("model.")] = parsed
        else:
            out[key] = parsed
    return out


def recipe_args(recipe: str, overrides: dict, data: Path, out: Path):
    """TrainingArgs of a shipped recipe (or config file) with overrides, into a scratch folder."""
    from mlx_transformer.train.args import build_args, merge, read_config_file

    values = merge(read_config_file(recipe), overrides, "--set")
    values = merge(values, {"data": str(data), "out": str(out), "progress": False}, "bench")
    return build_args(values)


def schedule(args, step: int) -> float:
    """The learning rate of update `step` (0 first): train.step.lr_schedule in plain Python."""
    peak, floor, warmup = args.learning_rate, args.min_learning_rate, args.warmup_steps
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    progress = min(max((step - warmup) / max(1, args.total_decay_steps - warmup), 0.0), 1.0)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


# -- ours ------------------------------------------------------------------------------------------


def run_ours(args, curve: Curve, val_batches: int, eval_batch: int) -> dict:
    from mlx.utils import tree_flatten

    from mlx_transformer.cpu.training import training_environment
    from mlx_transformer.train.evaluate import evaluate, val_bytes_per_token, validation_batches
    from mlx_transformer.train.trainer import Trainer

    with Trainer(args) as t, training_environment(t.streams):
        val = validation_batches(t.dataset, eval_batch, t.context, val_batches)
        bytes_per_token = val_bytes_per_token(t.dataset)
        train_s = 0.0
        while t.step < args.max_steps:
            tic = time.perf_counter()
            # As `train` runs: the next step is built while this one computes, unless the
            # weights are read (evaluated) after it.
            t.train_step(prefetch=not curve.due(t.step + 1, args.max_steps))
            train_s += time.perf_counter() - tic
            if curve.due(t.step, args.max_steps):
                tic = time.perf_counter()
                bpb = evaluate(t.model, val, bytes_per_token)["val_bpb"]
                if curve.add(t.step, train_s, time.perf_counter() - tic, bpb * math.log(2)):
                    break
        config = {**args.to_dict(), "model": t.model.config.to_dict(), "streams": t.streams}
        config["parameters"] = sum(v.size for _, v in tree_flatten(t.model.parameters()))
    return curve.result(config)


# -- nanoGPT's recipe in PyTorch ----------------------------------------------------------------


def run_torch(args, curve: Curve, val_batches: int, eval_batch: int, compiled: bool) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from bench_train import torch_model

    from mlx_transformer.data.batches import PretrainBatches
    from mlx_transformer.data.dataset import load_dataset
    from mlx_transformer.train.evaluate import val_bytes_per_token, validation_batches

    dataset = load_dataset(args.data)
    m = args.model
    context = args.context_length or m["max_position_embeddings"]
    c = dict(
        layers=m["num_hidden_layers"],
        heads=m["num_attention_heads"],
        width=m["hidden_size"],
        context=context,
        vocab=dataset.vocab_size,
    )
    model, groups = torch_model(c, args.seed)
    for g in groups:
        g["weight_decay"] = g["weight_decay"] and args.weight_decay
    optimizer = torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=(args.beta1, args.beta2), eps=args.adam_eps
    )
    forward = torch.compile(model) if compiled else model
    batches = PretrainBatches(dataset, args.batch_size, context, seed=args.seed)
    val = validation_batches(dataset, eval_batch, context, val_batches)
    bytes_per_token = val_bytes_per_token(dataset)

    def evaluate() -> float:
        model.eval()
        total, count = 0.0, 0.0
        with torch.no_grad():
            for b in val:
                logits = forward(torch.from_numpy(b.inputs.astype(np.int64))).logits
                targets = torch.from_numpy(b.targets.astype(np.int64))
                losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
                mask = (
                    torch.ones_like(losses)
                    if b.loss_mask is None
                    else torch.from_numpy(b.loss_mask).flatten()
                )
                total += float((losses * mask).sum())
                count += float(mask.sum())
        model.train()
        return total / max(count, 1) / bytes_per_token  # nats per byte (= per char here)

    train_s = 0.0
    for step in range(args.max_steps):
        tic = time.perf_counter()
        for g in optimizer.param_groups:
            g["lr"] = schedule(args, step)
        b = next(batches)
        x = torch.from_numpy(b.inputs.astype(np.int64))
        y = torch.from_numpy(b.targets.astype(np.int64))
        logits = forward(x).logits
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        train_s += time.perf_counter() - tic
        if curve.due(step + 1, args.max_steps) and curve.add(step + 1, train_s, *_timed(evaluate)):
            break
    config = {
        "recipe": "nanoGPT (PyTorch)",
        "torch": torch.__version__,
        "compiled": compiled,
        "threads": torch.get_num_threads(),
        **c,
        "batch": args.batch_size,
        "max_steps": args.max_steps,
    }
    config["parameters"] = sum(p.numel() for p in model.parameters())
    return curve.result(config)


def _timed(fn) -> tuple[float, float]:
    tic = time.perf_counter()
    value = fn()
    return time.perf_counter() - tic, value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--recipes",
        default="shakespeare_char,shakespeare_char_fast",
        help="ours: comma-separated shipped recipes or config files",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of our recipes (model.FIELD for the model)",
    )
    p.add_argument(
        "--torch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run nanoGPT's recipe in PyTorch (default: yes)",
    )
    p.add_argument(
        "--torch-modes",
        default="eager",
        help="comma-separated PyTorch runs: eager, compile (torch.compile the model) (eager)",
    )
    p.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--torch-recipe", default="shakespeare_char", help=argparse.SUPPRESS)
    p.add_argument("--target", type=float, help=f"nats/char (default {TARGET})")
    p.add_argument("--every", type=int, default=100, help="evaluate every N steps (100)")
    p.add_argument("--val-batches", type=int, default=0, help="0 = the whole val split (0)")
    p.add_argument("--eval-batch", type=int, default=64, help="sequences per eval batch (64)")
    p.add_argument("--max-steps", type=int, help="override every run's max_steps")
    p.add_argument("--stop-at-target", action="store_true", help="end each run on reaching it")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 10 steps, eval every 5 on one val batch, target 5.5",
    )
    p.add_argument(
        "--plot", type=Path, help=f"default {PLOT.relative_to(ROOT)} (none with --quick)"
    )
    p.add_argument("--json", type=Path, help="write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    ensure_fast_blas()
    args = parser().parse_args(argv)
    if args.quick:
        args.max_steps = args.max_steps or 10
        args.every, args.val_batches = min(args.every, 5), args.val_batches or 1
        args.eval_batch = min(args.eval_batch, 16)
        args.target = 5.5 if args.target is None else args.target
    target = TARGET if args.target is None else args.target
    modes = [m for m in args.torch_modes.split(",") if m]
    if not modes or set(modes) - {"eager", "compile"}:
        raise SystemExit(f"--torch-modes {args.torch_modes!r}: use eager, compile or eager,compile")
    ensure_data(args.data)
    from bench_common import cpu_model

    overrides = parse_sets(args.set)
    if args.max_steps:
        overrides["max_steps"] = args.max_steps
    label = ",".join(args.set)
    runs, loads = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in [r for r in args.recipes.split(",") if r]:
            name = Path(recipe).stem + (f" [{label}]" if label else "")
            settings = recipe_args(recipe, overrides, args.data, Path(tmp) / f"run{len(runs)}")
            curve = Curve(name, args.every, target, args.stop_at_target)
            loads[name] = _load(f"{name}: start")
            runs[name] = run_ours(settings, curve, args.val_batches, args.eval_batch)
        if args.torch:
            if args.torch_threads:
                import torch

                torch.set_num_threads(args.torch_threads)
            base = {"max_steps": args.max_steps} if args.max_steps else {}
            for mode in modes:
                out = Path(tmp) / f"torch_{mode}"
                settings = recipe_args(args.torch_recipe, base, args.data, out)
                name = TORCH + (" compile" if mode == "compile" else "")
                curve = Curve(name, args.every, target, args.stop_at_target)
                loads[name] = _load(f"{name}: start")
                runs[name] = run_torch(
                    settings, curve, args.val_batches, args.eval_batch, mode == "compile"
                )
    loads["end"] = _load("end")
    baselines = [r for r in runs if r.startswith(TORCH)] + [
        r for r in runs if r.split(" [")[0] == "shakespeare_char"
    ]
    results = {
        "target": target,
        "val_batches": args.val_batches,  # 0: the whole validation split
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "load_average": loads,
        "command": " ".join(["python", *sys.orig_argv[1:]]) if argv is None else str(argv),
        "runs": runs,
        "ratios": ratio_rows(runs, baselines),
    }
    print(report(results))
    plot_path = args.plot or (None if args.quick else PLOT)
    if plot_path is not None:
        plot(results, plot_path)
        print(f"wrote {plot_path}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _load(when: str) -> list[float]:
    load = [round(x, 2) for x in os.getloadavg()]
    print(f"load average ({when}): {load}", file=sys.stderr, flush=True)
    return load


if __name__ == "__main__":
    raise SystemExit(main())
