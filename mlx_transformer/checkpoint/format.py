"""The checkpoint folder contract, framework-free (shared by the MLX side and `export/`).

ckpt/
  config.json         ModelConfig.to_dict() + "model_type" + "format_version"
  model.safetensors   keys = ModelConfig.parameter_shapes(); float32 / bfloat16 / float16
  tokenizer.model     the sentencepiece model, byte for byte (optional for bare models)
  training_state/     resume only; export never reads it
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Collection
from pathlib import Path

import numpy as np

from .. import atomic
from ..config import ConfigError, ModelConfig
from ..errors import UserError
from ..tokenizer import TOKENIZER_FILE as TOKENIZER_FILE  # re-exported: part of the contract

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAINING_STATE_DIR = "training_state"

SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# Bytes per element of every safetensors dtype: the framing is checked whatever a file holds.
SAFETENSORS_ITEMSIZE = {
    **{t: 1 for t in ("BOOL", "U8", "I8", "F8_E4M3", "F8_E5M2")},
    **{t: 2 for t in ("U16", "I16", "F16", "BF16")},
    **{t: 4 for t in ("U32", "I32", "F32")},
    **{t: 8 for t in ("U64", "I64", "F64")},
}
MAX_HEADER_BYTES = 100_000_000
# A tensor of our floats is NaN or infinite exactly when its exponent bits are all ones.
_EXPONENT_BITS = {"F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80)}


class CheckpointError(UserError):
    """A checkpoint folder or file is missing, corrupt, or does not match its config."""


def read_safetensors_header(
    path: str | Path, dtypes: Collection[str] = tuple(SAFETENSORS_DTYPES)
) -> dict[str, dict]:
    """Validate a safetensors file's framing and return its tensor table {name: {dtype, shape,
    data_offsets}}, as the format's specification demands: a JSON object of entries, each with a
    known dtype, a shape and the offsets of exactly its bytes; the tensors tile the data with no
    overlap and no gap, and the data ends where the file does. Only `dtypes` are accepted.

    Catches truncated, corrupt and forged files with a message that says so, before any loader
    (MLX's or the numpy one) sees them.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            raw = f.read(n) if n is not None and n <= min(size - 8, MAX_HEADER_BYTES) else None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    if n is None:
        raise CheckpointError(f"{path}: truncated ({size} bytes); re-save the checkpoint")
    if raw is None:
        raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {n} bytes)")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)"
        )
    header.pop("__metadata__", None)
    spans = sorted((_entry_span(path, name, t, dtypes), name) for name, t in header.items())
    end = 0
    for (begin, stop), name in spans:
        if begin != end:
            what = "overlaps the tensor before it" if begin < end else "leaves a gap before it"
            raise CheckpointError(
                f"{path}: tensor {name} {what} (bytes {begin}..{stop}); the file is corrupt or "
                "forged — re-save the checkpoint"
            )
        end = stop
    body = size - 8 - n
    if end > body:
        raise CheckpointError(
            f"{path}: truncated ({size} bytes, the header describes {8 + n + end}); "
            "the file was cut short — re-save or re-download it"
        )
    if end < body:
        raise CheckpointError(
            f"{path}: {body - end} bytes after the last tensor; not a valid safetensors file"
        )
    return header


def _entry_span(path: Path, name: str, t: object, dtypes: Collection[str]) -> tuple[int, int]:
    """The (begin, end) data offsets of one header entry, checked against its dtype and shape."""

    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors header: tensor {name} {what}")

    if not isinstance(t, dict):
        raise corrupt("is not a JSON object")
    dtype, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
    if dtype not in SAFETENSORS_ITEMSIZE:
        raise corrupt(f"has no valid dtype ({dtype!r})")
    if dtype not in dtypes:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype}")
    if not isinstance(shape, list) or not all(_is_uint(d, 2**31) for d in shape):
        raise corrupt(f"has no valid shape ({shape!r})")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_uint, offsets))):
        raise corrupt(f"has no valid data_offsets ({offsets!r})")
    begin, end = offsets
    nbytes = math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
    if end - begin != nbytes:
        raise corrupt(
            f"has data_offsets {offsets} ({end - begin} bytes); its shape {shape} and dtype "
            f"{dtype} need {nbytes}"
        )
    return begin, end


def _is_uint(value: object, below: int = 2**64) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < below


def find_non_finite(path: str | Path, header: dict[str, dict]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, or None, for a file whose
    `header` was validated. Reads the data once, in chunks of bounded size, with numpy alone
    (a bit test on the exponent: no decoding to float)."""
    path = Path(path)
    with open(path, "rb") as f:
        start = 8 + struct.unpack("<Q", f.read(8))[0]
    if path.stat().st_size == start:
        return None  # no data at all (numpy cannot map an empty range)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start)
    chunk = 1 << 24  # bytes
    for name, t in header.items():
        if t["dtype"] not in _EXPONENT_BITS:
            continue
        bits, mask = _EXPONENT_BITS[t["dtype"]]
        begin, end = t["data_offsets"]
        for at in range(begin, end, chunk):
            values = data[at : min(end, at + chunk)].view(bits)
            if np.any((values & mask) == mask):
                return name
    return None


def check_tensor_shapes(config: ModelConfig, found: dict[str, tuple[int, ...]], where: str) -> None:
    """Strict loading: every expected tensor present with its shape, and nothing else.

    The expected tensors are listed one at a time and the first one missing stops the check, so
    the work is bounded by what was found, whatever number of layers the config claims.
    """
    expected: dict[str, tuple[int, ...]] = {}
    for name, shape in config.iter_parameter_shapes():
        if name not in found:
            raise CheckpointError(
                f"{where}: missing tensor {name} required by the config, which describes "
                f"{config.num_tensors():,} tensors ({len(found):,} found)"
            )
        expected[name] = shape
    extra = sorted(set(found) - set(expected))
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


def validate_checkpoint(
    ckpt: str | Path, check_values: bool = False
) -> tuple[ModelConfig, dict[str, dict]]:
    """Read config.json and the safetensors header and check that they agree: names, shapes,
    dtypes, offsets (see `read_safetensors_header`). With `check_values`, also read the data and
    refuse NaN and infinity (the MLX loader checks those as it loads)."""
    config = read_config(ckpt)
    weights = Path(ckpt) / WEIGHTS_FILE
    header = read_safetensors_header(weights)
    check_tensor_shapes(config, {k: tuple(v["shape"]) for k, v in header.items()}, str(weights))
    if check_values and (name := find_non_finite(weights, header)) is not None:
        raise non_finite_error(weights, name)
    return config, header


def non_finite_error(weights: str | Path, name: str, dtype: str | None = None) -> CheckpointError:
    if dtype is not None:  # the cast may be what overflowed
        return CheckpointError(
            f"{weights}: tensor {name} holds NaN or infinity as {dtype} (values beyond its "
            "range, or already in the file); load it in float32"
        )
    return CheckpointError(
        f"{weights}: tensor {name} contains NaN or infinity; the weights are ruined (e.g. saved "
        "after training diverged): use an earlier checkpoint"
    )


# How every checkpoint folder is written: `fill(tmp_folder)`, then swapped in whole.
write_folder_atomically = atomic.write_folder
