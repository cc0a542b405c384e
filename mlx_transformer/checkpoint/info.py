"""`mlx-transformer info CKPT`: what a checkpoint holds, checked as strictly as the loaders do.

It runs the loaders' own checks (`format.validate_checkpoint`), without MLX: config.json's fields
and bounds; the safetensors framing (a JSON object of entries with known dtypes, each tensor's
offsets spanning exactly its shape's bytes, no overlap, no gap, nothing cut off or left over);
every tensor the config needs with its shape and nothing else; every value finite, by reading
the data once (at disk speed: a second or so per GB); and a tokenizer.model that sentencepiece
reads, with no more ids than the model has embeddings. A folder `info` passes, the loaders load.
"""

from __future__ import annotations

from pathlib import Path

from ..tokenizer_files import find_tokenizer, load_tokenizer
from .format import TRAINING_STATE_DIR, validate_checkpoint

CHECKED = "config, safetensors framing and offsets, names and shapes, finite values, tokenizer"


def describe(ckpt: str | Path) -> str:
    """A short text description of a checkpoint folder (strictly validated)."""
    config, header = validate_checkpoint(ckpt, check_values=True)
    tokenizer = find_tokenizer(ckpt)
    if tokenizer is not None:
        load_tokenizer(tokenizer).check_fits(config.vocab_size)
    dtypes = sorted({t["dtype"] for t in header.values()})
    lines = [f"{ckpt}: {config.num_parameters() / 1e6:.3f} M parameters ({', '.join(dtypes)})"]
    lines += [f"  {k:<24} {v}" for k, v in config.to_dict().items() if k != "extra"]
    lines.append(f"  {'tokenizer':<24} {tokenizer.name if tokenizer else None}")
    lines.append(f"  {'training_state':<24} {(Path(ckpt) / TRAINING_STATE_DIR).is_dir()}")
    lines.append(f"  {'checked':<24} {CHECKED}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("ckpt", help="a checkpoint folder")


def run(args) -> int:
    print(describe(args.ckpt))
    return 0
