"""Evaluation: the fixed validation sample, mean loss / perplexity / bits per byte over it
(shared out across processes), and `evaluate_checkpoint` for a saved model.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..checkpoint.mlx_io import load_checkpoint
from ..data.batches import Batch, FinetuneBatches, val_windows
from ..data.dataset import Dataset, load_dataset
from ..model import Transformer
from .step import loss_sum, to_mx


def validation_batches(
    dataset: Dataset, batch_size: int, context: int, num_batches: int
) -> list[Batch]:
    """The fixed validation sample: `num_batches` batches of windows spread evenly over the
    val split (0 = every token of it, via data.val_windows)."""
    if "val" not in dataset.splits or dataset.splits["val"].tokens < 2:
        return []
    if dataset.kind == "finetune":
        val = FinetuneBatches(dataset, batch_size, context, split="val", shuffle=False)
        return [val.batch(k) for k in range(num_batches or val.steps_per_epoch)]
    if num_batches == 0:
        return list(val_windows(dataset, batch_size, context))
    shards = dataset.splits["val"].shards
    starts = [(k, s) for k, sh in enumerate(shards) for s in range(0, len(sh) - context, context)]
    if len(starts) <= num_batches * batch_size:
        return list(val_windows(dataset, batch_size, context))
    picks = np.linspace(0, len(starts) - 1, num_batches * batch_size).round().astype(int)
    windows = np.stack([shards[k][s : s + context + 1] for k, s in (starts[i] for i in picks)])
    windows = windows.astype(np.int32)
    return [
        Batch(inputs=w[:, :-1], targets=w[:, 1:])
        for w in np.split(windows, num_batches)  # (B, context + 1) each
    ]


def evaluate(
    model: Transformer,
    batches: list[Batch],
    bytes_per_token: float,
    group: mx.distributed.Group | None = None,
) -> dict[str, float]:
    """Mean loss (nats/token), perplexity and bits per byte over `batches` (shared out across
    the processes of `group`, then summed)."""
    rank, world = (group.rank(), group.size()) if group is not None else (0, 1)
    was_training = model.training
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    for batch in batches[rank::world]:
        s, n = loss_sum(model, to_mx(batch))
        total, count = total + s, count + n
        mx.eval(total, count)
    if world > 1:
        total = mx.distributed.all_sum(total, group=group)
        count = mx.distributed.all_sum(count, group=group)
    model.train(was_training)
    loss = (total / mx.maximum(count, 1)).item()
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 700)),
        "val_bpb": loss / math.log(2) / bytes_per_token,
    }


def evaluate_checkpoint(
    ckpt: str | Path, data: str | Path, batch_size: int = 12, num_batches: int = 0
) -> dict[str, float]:
    """Loss, perplexity and bits per byte of a checkpoint on a dataset's val split (0 batches
    = every val token once, in windows of the model's context)."""
    model = load_checkpoint(ckpt)
    dataset = load_dataset(data)
    context = model.config.max_position_embeddings
    batches = validation_batches(dataset, batch_size, context, num_batches)
    return evaluate(model, batches, val_bytes_per_token(dataset))


def val_bytes_per_token(dataset: Dataset) -> float:
    info = dataset.splits["val"].info if "val" in dataset.splits else {}
    if dataset.kind == "finetune" and info.get("completion_tokens"):
        return info["completion_bytes"] / info["completion_tokens"]
    return dataset.bytes_per_token("val") if "val" in dataset.splits else float("nan")
