"""The checkpoint folder contract, framework-free (shared by the MLX side and `export/`).

ckpt/
  config.json         ModelConfig.to_dict() + "model_type" + "format_version"
  model.safetensors   keys = ModelConfig.parameter_shapes(); float32 / bfloat16 / float16
  tokenizer.model     the sentencepiece model, byte for byte (optional for bare models)
  training_state/     resume only; export never reads it
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .. import atomic
from ..config import ConfigError, ModelConfig
from ..errors import UserError
from ..tokenizer import TOKENIZER_FILE as TOKENIZER_FILE  # re-exported: part of the contract

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAINING_STATE_DIR = "training_state"

SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class CheckpointError(UserError):
    """A checkpoint folder or file is missing, corrupt, or does not match its config."""


def read_safetensors_header(path: str | Path) -> dict[str, dict]:
    """Validate a safetensors file's framing and return its tensor table {name: {dtype, shape}}.

    Catches truncated and corrupt files with a message that says so, before any loader sees them.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated ({size} bytes); re-save the checkpoint")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(
                f"{path}: truncated or not a safetensors file (header of {n} bytes)"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated ({size} bytes, the header describes {8 + n + end}); "
            "the file was cut short — re-save or re-download it"
        )
    for name, t in header.items():
        if t["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {t['dtype']}")
    return header


def check_tensor_shapes(config: ModelConfig, found: dict[str, tuple[int, ...]], where: str) -> None:
    """Strict loading: every expected tensor present with its shape, and nothing else."""
    expected = config.parameter_shapes()
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: missing tensor {missing[0]}{more} required by the config")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{where}: unexpected tensor {extra[0]}{more} not in the config")
    for name, shape in expected.items():
        if tuple(found[name]) != shape:
            raise CheckpointError(
                f"{where}: tensor {name} has shape {tuple(found[name])}, the config expects {shape}"
            )


def read_config(ckpt: str | Path) -> ModelConfig:
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(
            f"{ckpt}: not a checkpoint folder (expected {CONFIG_FILE} and {WEIGHTS_FILE} inside)"
        )
    try:
        return ModelConfig.load(ckpt / CONFIG_FILE)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def validate_checkpoint(ckpt: str | Path) -> tuple[ModelConfig, dict[str, dict]]:
    """Read config.json and the safetensors header and check that they agree, loading no data."""
    config = read_config(ckpt)
    weights = Path(ckpt) / WEIGHTS_FILE
    header = read_safetensors_header(weights)
    check_tensor_shapes(config, {k: tuple(v["shape"]) for k, v in header.items()}, str(weights))
    return config, header


# How every checkpoint folder is written: `fill(tmp_folder)`, then swapped in whole.
write_folder_atomically = atomic.write_folder
