"""`mlx-transformer fuse`: fold LoRA adapters into their base model and save a plain checkpoint.

The base model is the one recorded in adapter_config.json unless --model names another; the
tokenizer comes from the base model's folder, else from the adapter folder.

    mlx-transformer fuse --adapters DIR --out CKPT [--model BASE] [--dtype bfloat16] [--overwrite]

--out must be a new or empty folder; --overwrite replaces only a checkpoint written before by
fuse or convert (never a training run's, a folder of other files, or an input).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import atomic
from ..checkpoint.hf import CHECKPOINT, load_pretrained
from ..checkpoint.mlx_io import save_checkpoint
from ..errors import UserError
from ..tokenizer_files import find_tokenizer
from .lora import fuse_lora, load_adapters, read_adapter_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="the base checkpoint (default: the one the adapters name)")
    parser.add_argument("--adapters", required=True, metavar="DIR", help="adapter folder")
    parser.add_argument(
        "--out", required=True, metavar="CKPT", help="fused checkpoint to write (new or empty)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a checkpoint an earlier fuse wrote"
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="save as")


def fuse(
    model_path: str | Path | None,
    adapters: str | Path,
    out: str | Path,
    dtype=None,
    overwrite: bool = False,
) -> Path:
    """Fuse the adapters in `adapters` into the base checkpoint and save a plain checkpoint.

    Args:
        model_path: the base checkpoint; None = the `base_model` recorded in adapter_config.json.
        adapters: the adapter folder.
        out: the checkpoint folder to write (config.json, model.safetensors, tokenizer.model).
        dtype: save the weights in this dtype; default as the base model.
        overwrite: replace a checkpoint written before by fuse or convert at `out`.
    Returns:
        The written folder.
    """
    config = read_adapter_config(adapters)
    base = model_path or config.get("base_model")
    if base is None:
        raise UserError(f"{adapters} does not name its base model; pass --model")
    inputs = (base, adapters)
    # Refused outputs fail here, before the weights are read; the writer checks again.
    atomic.check_output(out, CHECKPOINT, overwrite=overwrite, inputs=inputs)
    model, tokenizer = load_pretrained(base)
    load_adapters(model, adapters)
    fuse_lora(model)
    tokenizer = tokenizer or find_tokenizer(adapters)
    return save_checkpoint(
        out,
        model,
        tokenizer_path=tokenizer,
        dtype=dtype,
        kind=CHECKPOINT,
        overwrite=overwrite,
        inputs=inputs,
    )


def run(args: argparse.Namespace) -> int:
    out = fuse(args.model, args.adapters, args.out, args.dtype, args.overwrite)
    print(f"wrote {out}")
    return 0
