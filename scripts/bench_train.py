"""Training throughput: our compiled MLX step vs Hugging Face GPT-2 in PyTorch (eager, compiled).

The same architecture on both sides: GPT-2 (learned positions, pre-LN, GELU-tanh, tied
embeddings, biases), AdamW (wd 0.1 on matrices, betas 0.9/0.99) with global-norm clipping at 1.0,
float32, dropout 0, the same batch and context. Each trial times `--steps` optimizer steps of
each implementation in turn (interleaved, so machine load hits all alike) after warmup steps
that absorb compilation; the table shows medians over trials.

    .venv/bin/python scripts/bench_train.py                       # both configs
    .venv/bin/python scripts/bench_train.py --configs small --trials 7 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_transformer.cpu.blas import ensure_fast_blas  # noqa: E402  (must run before mlx loads)

CONFIGS = {
    # nanoGPT's CPU Shakespeare-char config.
    "small": dict(layers=4, heads=4, width=128, context=64, batch=12, vocab=65, steps=30),
    # nanoGPT's GPU Shakespeare-char model size, at the small config's batch.
    "medium": dict(layers=6, heads=6, width=384, context=256, batch=12, vocab=65, steps=4),
}


def mlx_model(c: dict, seed: int = 0):
    """Our GPT-2 style Transformer of config `c` (with c["window"] and c["model"]'s fields where
    given), random weights from `seed`, in training mode."""
    import mlx.core as mx

    from mlx_transformer.config import ModelConfig
    from mlx_transformer.model import Transformer

    config = ModelConfig(
        vocab_size=c["vocab"],
        hidden_size=c["width"],
        num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"],
        max_position_embeddings=c["context"],
        **{"hidden_act": "gelu_tanh", "sliding_window": c.get("window"), **c.get("model", {})},
    )
    mx.random.seed(seed)
    model = Transformer(config)
    model.train()
    return model


def mlx_runner(c: dict, seed: int = 0, streams: int | None = None):
    """Our step as `mlx-transformer train` runs it: streams=None picks its default (one per core
    on the CPU backend); streams=1 measures the single-stream step."""
    import mlx.core as mx
    import numpy as np

    from mlx_transformer.cpu.blas import cores
    from mlx_transformer.cpu.training import default_streams, training_environment
    from mlx_transformer.train.args import TrainingArgs
    from mlx_transformer.train.step import Stepper, make_optimizer

    model = mlx_model(c, seed)
    args = TrainingArgs(learning_rate=1e-3, warmup_steps=10)
    streams = min(streams or default_streams(cores()), c["batch"])
    optimizer = make_optimizer(args, model.trainable_parameters())
    stepper = Stepper(model, optimizer, grad_clip=1.0, streams=streams)
    rng = np.random.default_rng(seed)
    data = rng.integers(0, c["vocab"], (16, c["batch"], c["context"] + 1)).astype(np.int32)
    batches = [(mx.array(d[:, :-1]), mx.array(d[:, 1:]), None, None) for d in data]

    def run(steps: int, offset: int = 0) -> float:
        # As `mlx-transformer train` runs: every core, the buffer cache, and each step built
        # and started (async_eval) before the previous one is waited for.
        with training_environment(streams):
            previous = None
            for i in range(steps):
                loss, _ = stepper.step(batches[(offset + i) % len(batches)])
                mx.async_eval(stepper.state, loss)
                if previous is not None:
                    previous.item()
                previous = loss
            return previous.item()

    return run


def torch_model(c: dict, seed: int = 0):
    """nanoGPT's model in PyTorch (Hugging Face GPT-2, dropout 0) and AdamW's parameter groups
    (weight decay 0.1 on matrices and embeddings, as nanoGPT and we do)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=c["vocab"],
        n_positions=c["context"],
        n_embd=c["width"],
        n_layer=c["layers"],
        n_head=c["heads"],
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,  # GPT-2's 50256 lies outside these vocabularies
        eos_token_id=None,
    )
    model = GPT2LMHeadModel(config)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return model, groups


def torch_runner(c: dict, compiled: bool, seed: int = 0):
    import torch
    import torch.nn.functional as F

    model, groups = torch_model(c, seed)
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))
    forward = torch.compile(model) if compiled else model
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, c["vocab"], (16, c["batch"], c["context"] + 1), generator=gen)

    def run(steps: int, offset: int = 0) -> float:
        for i in range(steps):
            d = data[(offset + i) % len(data)]
            logits = forward(d[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), d[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        return loss.item()

    return run


def bench(name: str, c: dict, trials: int, impls: list[str]) -> dict:
    runners = {}
    for impl in impls:
        tic = time.perf_counter()
        runner = {
            "mlx": lambda: mlx_runner(c),
            "mlx_one_stream": lambda: mlx_runner(c, streams=1),
            "torch_eager": lambda: torch_runner(c, compiled=False),
            "torch_compile": lambda: torch_runner(c, compiled=True),
        }[impl]()
        runner(3)  # warmup: compilation, allocator
        runners[impl] = runner
        print(f"  {name}/{impl}: ready in {time.perf_counter() - tic:.1f}s", file=sys.stderr)
    seconds = {impl: [] for impl in impls}
    for t in range(trials):
        for impl, runner in runners.items():
            tic = time.perf_counter()
            runner(c["steps"], offset=t)
            seconds[impl].append((time.perf_counter() - tic) / c["steps"])
    tokens = c["batch"] * c["context"]
    out = {}
    for impl, s in seconds.items():
        med = sorted(s)[len(s) // 2]
        out[impl] = {"ms_per_step": med * 1e3, "tokens_per_sec": tokens / med, "trials_s": s}
    return out


def main() -> None:
    ensure_fast_blas()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="small,medium")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument(
        "--impls",
        default="mlx,torch_eager,torch_compile",
        help="comma-separated: mlx (as `train` runs), mlx_one_stream (--streams 1), torch_eager, "
        "torch_compile",
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads")
    args = parser.parse_args()

    import mlx.core as mx
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    from mlx_transformer.cpu.blas import blas_summary

    impls = args.impls.split(",")
    results = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "mlx": mx.__version__,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
            "blas": blas_summary(),
        },
        "configs": {},
    }
    print(f"mlx {mx.__version__} ({blas_summary()}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)  # fmt: skip
    for name in args.configs.split(","):
        c = CONFIGS[name]
        results["configs"][name] = {"config": c, "results": bench(name, c, args.trials, impls)}
    print("\n| config | impl | ms/step | tokens/s | vs torch eager |\n|---|---|---|---|---|")
    for name, r in results["configs"].items():
        base = r["results"].get("torch_eager", {}).get("tokens_per_sec")
        for impl, v in r["results"].items():
            ratio = f"{v['tokens_per_sec'] / base:.2f}x" if base else "-"
            ms, tok_s = v["ms_per_step"], v["tokens_per_sec"]
            print(f"| {name} | {impl} | {ms:.1f} | {tok_s:,.0f} | {ratio} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
