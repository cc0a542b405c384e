"""`mlx-transformer info CKPT`: what a checkpoint holds, checked without loading the weights."""

from __future__ import annotations

from pathlib import Path

from .format import TOKENIZER_FILE, TRAINING_STATE_DIR, validate_checkpoint


def describe(ckpt: str | Path) -> str:
    """A short text description of a checkpoint folder (strictly validated)."""
    config, header = validate_checkpoint(ckpt)
    dtypes = sorted({t["dtype"] for t in header.values()})
    lines = [f"{ckpt}: {config.num_parameters() / 1e6:.3f} M parameters ({', '.join(dtypes)})"]
    lines += [f"  {k:<24} {v}" for k, v in config.to_dict().items() if k != "extra"]
    lines.append(f"  {'tokenizer.model':<24} {(Path(ckpt) / TOKENIZER_FILE).is_file()}")
    lines.append(f"  {'training_state':<24} {(Path(ckpt) / TRAINING_STATE_DIR).is_dir()}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("ckpt", help="a checkpoint folder")


def run(args) -> int:
    print(describe(args.ckpt))
    return 0
