"""Read a checkpoint folder with numpy alone (no MLX, no torch), strictly.

`validate_checkpoint` (shared with the MLX side) checks config.json against the safetensors
header: every tensor the config needs, with its shape, and nothing else; offsets that give each
tensor exactly its bytes, none shared; and every value finite. This module then reads the raw
bytes itself, because numpy has no bfloat16 (it is the top half of a float32).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from mlx_transformer.checkpoint.format import WEIGHTS_FILE, validate_checkpoint
from mlx_transformer.config import ModelConfig

_NUMPY_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


class Weights:
    """The checkpoint's tensors as float32 arrays, remembering which ones were taken."""

    def __init__(self, arrays: dict[str, np.ndarray], dtype: str):
        self.arrays = arrays
        self.dtype = dtype  # as stored: "float32", "float16", "bfloat16" or "mixed"
        self._taken: set[str] = set()

    def take(self, key: str) -> np.ndarray:
        if key not in self.arrays:
            raise KeyError(f"the graph asked for {key}, which the checkpoint does not have")
        self._taken.add(key)
        return self.arrays[key]

    def unused(self) -> list[str]:
        return sorted(set(self.arrays) - self._taken)


def decode(raw: bytes | np.ndarray, dtype: str, shape: list[int]) -> np.ndarray:
    """Little-endian safetensors bytes of `dtype` (F32/F16/BF16) as a float32 array."""
    data = np.frombuffer(raw, dtype=_NUMPY_DTYPES[dtype])
    if dtype == "BF16":
        data = (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32).reshape(shape)


def read_checkpoint(ckpt: str | Path) -> tuple[ModelConfig, Weights]:
    """Config and float32 weights of a checkpoint folder; strict about names, shapes, offsets and
    values (`validate_checkpoint` with `check_values`: every value finite).

    Raises:
        CheckpointError: the folder, config or weights file is missing, corrupt or inconsistent.
    """
    config, header = validate_checkpoint(ckpt, check_values=True)
    path = Path(ckpt) / WEIGHTS_FILE
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))  # framing already validated by the header check
    body = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if header else None
    arrays = {}
    for name, t in header.items():
        begin, end = t["data_offsets"]  # each tensor's own bytes, checked against its shape
        arrays[name] = decode(body[begin:end], t["dtype"], t["shape"])
    stored = {t["dtype"] for t in header.values()}
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    dtype = names[stored.pop()] if len(stored) == 1 else "mixed"
    return config, Weights(arrays, dtype)
