"""Save and load the checkpoint folder (see `checkpoint_format` for the contract).

Strict: a missing, extra or mis-shaped tensor is an error that names it. Safetensors only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..config import ModelConfig
from ..model import Transformer
from ..tokenizer_files import copy_tokenizer
from .format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    check_tensor_shapes,
    non_finite_error,
    validate_checkpoint,
    write_folder_atomically,
)

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def save_checkpoint(
    path: str | Path,
    model: Transformer,
    tokenizer_path: str | Path | None = None,
    dtype: str | None = None,
    write_extra: Callable[[Path], None] | None = None,
    **output,
) -> Path:
    """Write `path/` = config.json + model.safetensors (+ tokenizer.model) atomically.

    Args:
        path: the checkpoint folder; replaced as a whole if it exists.
        model: the model; its `config` is saved with it.
        tokenizer_path: a tokenizer to copy in byte for byte (tokenizer.model, or tokenizer.json
            with the files beside it: `tokenizer_files.copy_tokenizer`).
        dtype: save the weights in this dtype ("float32", "bfloat16", "float16"); default as is.
        write_extra: called with the temporary folder to add more (e.g. training_state/).
        output: `kind`, `overwrite`, `inputs` of `atomic.write_folder`, for a user's output
            folder; none (a run's own checkpoints): whatever is at `path` is replaced.
    Returns:
        The folder.
    """
    weights = dict(tree_flatten(model.parameters()))
    if dtype is not None:
        weights = {k: v.astype(DTYPES[dtype]) for k, v in weights.items()}
    check_tensor_shapes(model.config, {k: v.shape for k, v in weights.items()}, "model")

    def fill(tmp: Path) -> None:
        model.config.save(tmp / CONFIG_FILE)
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
        if tokenizer_path is not None:
            copy_tokenizer(tokenizer_path, tmp)
        if write_extra is not None:
            write_extra(tmp)

    return write_folder_atomically(path, fill, **output)


def load_weights(path: str | Path) -> tuple[ModelConfig, dict[str, mx.array]]:
    """Read and check a checkpoint's config and weights (strict), without building a model.

    The arrays are lazy: `load_checkpoint` evaluates them, with their finiteness check, at once.
    """
    config, _ = validate_checkpoint(path)
    try:
        weights = mx.load(str(Path(path) / WEIGHTS_FILE))
    except (RuntimeError, ValueError) as e:  # framing was checked; this is corrupt content
        raise CheckpointError(f"{Path(path) / WEIGHTS_FILE}: cannot be read ({e})") from None
    return config, weights


def load_checkpoint(path: str | Path, dtype: str | None = None) -> Transformer:
    """Build the model of `path/config.json` and load `path/model.safetensors` into it (strict).

    Args:
        path: the checkpoint folder.
        dtype: cast the weights to this dtype; default: as stored.
    Returns:
        The model, evaluated and in eval mode; its config is `model.config`.
    Raises:
        CheckpointError: the folder is missing, inconsistent, or a tensor holds NaN or infinity.
    """
    config, weights = load_weights(path)
    if dtype is not None:
        weights = {k: v.astype(DTYPES[dtype]) for k, v in weights.items()}
    model = Transformer(config)
    model.update(tree_unflatten(list(weights.items())))
    model.eval()
    # One reduction per tensor, a sum (NaN and infinity carry through it; on a CPU it costs a
    # tenth of an element-wise isfinite), evaluated with the weights: one pass, one sync.
    sums = mx.stack([v.sum().astype(mx.float32) for v in weights.values()])
    mx.eval(model.parameters(), sums)
    for name, total in zip(weights, sums.tolist()):
        # A sum of finite values can overflow too: look at the elements before refusing.
        if not math.isfinite(total) and not mx.isfinite(weights[name]).all().item():
            raise non_finite_error(Path(path) / WEIGHTS_FILE, name, dtype)
    return model
