"""`mlx-transformer demo`: the main job on the embedded default, end to end.

Today: build a small model of the default configuration, run it, save the checkpoint, reload it
and check that the reloaded model gives the same logits.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from .checkpoint import load_checkpoint, save_checkpoint
from .config import ModelConfig
from .model import Transformer


def run_demo(out: str | Path, seed: int = 0) -> dict:
    """Build, run, save and reload a model in `out/checkpoint`. Returns the figures it measured."""
    out = Path(out)
    mx.random.seed(seed)
    config = ModelConfig()
    model = Transformer(config)
    mx.eval(model.parameters())
    print(
        f"[1/3] model: {config.num_parameters() / 1e6:.2f} M parameters "
        f"({config.num_hidden_layers} layers, width {config.hidden_size}, "
        f"{config.position_encoding} positions, {config.norm_position}-{config.norm_type})"
    )

    ids = mx.random.randint(0, config.vocab_size, (4, config.max_position_embeddings))
    tic = time.perf_counter()
    logits = model(ids)
    mx.eval(logits)
    seconds = time.perf_counter() - tic
    print(
        f"[2/3] forward: {ids.size} tokens in {seconds * 1e3:.0f} ms "
        f"({ids.size / seconds:,.0f} tokens/s)"
    )

    folder = save_checkpoint(out / "checkpoint", model)
    reloaded = load_checkpoint(folder)
    diff = float(np.abs(np.array(reloaded(ids)) - np.array(logits)).max())
    print(f"[3/3] checkpoint: {folder} saved and reloaded; max logit difference {diff:.1e}")
    if diff != 0.0:
        raise RuntimeError(f"reloaded checkpoint differs from the model by {diff}")
    return {
        "parameters": config.num_parameters(),
        "forward_tokens_per_s": ids.size / seconds,
        "reload_max_abs_diff": diff,
        "checkpoint": str(folder),
    }


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    run_demo(args.out, args.seed)
    return 0
