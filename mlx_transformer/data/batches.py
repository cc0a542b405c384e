"""Batches from a prepared `Dataset`, numpy only (training converts them to `mx.array`).

- `PretrainBatches`: random windows of context + 1 tokens; inputs = w[:-1], targets = w[1:].
  Batch k depends only on (seed, rank, k), so resuming from `state_dict()` replays exactly.
- `val_windows`: every token of a split once, in order, for evaluation (and bits per byte).
- `FinetuneBatches`: prompt/completion examples, right-padded, with attention and loss masks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError
from .dataset import Dataset


@dataclass
class Batch:
    """Numpy arrays for one step; masks None mean "all ones"."""

    inputs: np.ndarray  # (B, T) int32
    targets: np.ndarray  # (B, T) int32, targets[:, t] = the token after inputs[:, t]
    attention_mask: np.ndarray | None = None  # (B, T) int32: 1 real token, 0 padding
    loss_mask: np.ndarray | None = None  # (B, T) float32: 1 where the target counts


class _Position:
    """A batch stream's resumable position: batch k is a pure function of (seed, rank, k)."""

    kind = ""  # "pretrain" or "finetune": a saved position fits only its own kind of stream

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position; with it, the next batches repeat exactly.

        The random state is derived from (seed, rank, step), so these few numbers are all of it.
        """
        return {
            "kind": self.kind,
            "split": self.split.name,
            "split_tokens": self.split.tokens,
            "seed": self.seed,
            "step": self.step,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind or state.get("split_tokens") != self.split.tokens:
            raise UserError(
                f"the saved data position is for another dataset ({state.get('kind')}, "
                f"{state.get('split_tokens')} tokens; this {self.split.name} split has "
                f"{self.split.tokens}); resume with the dataset the run started with"
            )
        self.seed, self.step = int(state["seed"]), int(state["step"])


class PretrainBatches(_Position):
    """Random windows of `context + 1` contiguous tokens from one split, forever.

    A window never crosses shards (it may cross documents: they are joined by eos). Batch k is a
    pure function of (seed, rank, k): ranks of a data-parallel run draw different windows, and a
    run resumed from `state_dict()` draws exactly the batches it would have drawn.
    """

    kind = "pretrain"

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        context: int,
        split: str = "train",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if dataset.kind != "pretrain":
            raise UserError(f"dataset {dataset.path} is for fine-tuning; use FinetuneBatches")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.split = dataset.splits[split]
        self.batch_size, self.context = batch_size, context
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0
        # Valid window starts per shard, and their running total, to draw starts uniformly.
        starts = [max(len(s) - context, 0) for s in self.split.shards]
        self._cum_starts = np.cumsum(starts)
        if not starts or self._cum_starts[-1] == 0:
            raise UserError(
                f"the {split} split of {dataset.path} has no run of {context + 1} tokens in one "
                "shard; lower the context length or add data"
            )

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = self.batch(self.step)
        self.step += 1
        return batch

    def batch(self, step: int) -> Batch:
        """Batch number `step` of this rank (does not move the iterator)."""
        rng = np.random.default_rng([self.seed, self.rank, step])
        picks = rng.integers(0, self._cum_starts[-1], size=self.batch_size)
        shards = np.searchsorted(self._cum_starts, picks, side="right")
        offsets = picks - np.concatenate([[0], self._cum_starts])[shards]
        T = self.context
        w = np.stack([self.split.shards[s][o : o + T + 1] for s, o in zip(shards, offsets)])
        w = w.astype(np.int32)  # (B, T + 1)
        return Batch(inputs=w[:, :-1], targets=w[:, 1:])


def val_windows(
    dataset: Dataset, batch_size: int, context: int, split: str = "val"
) -> Iterator[Batch]:
    """Every token of a split once, in order: windows of `context + 1` tokens with stride
    `context`, each shard's last window right-padded (`loss_mask` marks real targets).

    Every token but the first of each shard is a target exactly once, so summed losses over
    these batches give the split's loss and, with `Split.bytes`, its bits per byte. The last
    batch may hold fewer rows.
    """
    pad = dataset.pad_id
    rows: list[tuple[np.ndarray, int]] = []
    for shard in dataset.splits[split].shards:
        for start in range(0, max(len(shard) - 1, 0), context):
            window = np.asarray(shard[start : start + context + 1], np.int32)
            rows.append((window, len(window) - 1))
            if len(rows) == batch_size:
                yield _padded(rows, context, pad)
                rows = []
    if rows:
        yield _padded(rows, context, pad)


def _padded(rows: list[tuple[np.ndarray, int]], context: int, pad: int) -> Batch:
    w = np.full((len(rows), context + 1), pad, np.int32)
    loss = np.zeros((len(rows), context), np.float32)
    for i, (window, n_targets) in enumerate(rows):
        w[i, : len(window)] = window
        loss[i, :n_targets] = 1
    return Batch(inputs=w[:, :-1], targets=w[:, 1:], attention_mask=None, loss_mask=loss)


class FinetuneBatches(_Position):
    """Prompt/completion examples in right-padded batches, shuffled each epoch, forever.

    Each example is prompt ids + completion ids + eos. The loss covers the completion and the
    eos only. Truncation: an example longer than `context + 1` tokens keeps its first
    `context + 1` (the end of the completion is lost; a prompt that fills the whole context
    leaves no loss at all). Batches are as long as their longest example, rounded up to a
    multiple of `pad_multiple` (capped at `context`), so compiled steps see few shapes.

    Like `PretrainBatches`, batch k is a pure function of (seed, rank, k).
    """

    kind = "finetune"

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        context: int,
        split: str = "train",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        pad_multiple: int = 8,
    ):
        if dataset.kind != "finetune":
            raise UserError(f"dataset {dataset.path} is for pretraining; use PretrainBatches")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.split = dataset.splits[split]
        if len(self.split.examples) == 0:
            raise UserError(f"the {split} split of {dataset.path} holds no examples")
        self.batch_size, self.context, self.pad_multiple = batch_size, context, pad_multiple
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.pad_id = dataset.pad_id
        self.step = 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation) cache

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.split.examples) / (self.batch_size * self.world_size))

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = self.batch(self.step)
        self.step += 1
        return batch

    def example_indices(self, step: int) -> list[int]:
        """Rows of `split.examples` in batch `step` of this rank: the examples of all epochs
        form one stream, each rank taking its `batch_size` from each global batch."""
        n = len(self.split.examples)
        first = (step * self.world_size + self.rank) * self.batch_size
        return [
            int(self._permutation(i // n)[i % n]) for i in range(first, first + self.batch_size)
        ]

    def batch(self, step: int) -> Batch:
        """Batch number `step` of this rank (does not move the iterator)."""
        rows = self.split.examples[self.example_indices(step)]
        longest = int(min(rows[:, 3].max(), self.context + 1)) - 1
        T = min(self.context, max(1, -(-longest // self.pad_multiple) * self.pad_multiple))
        w = np.full((len(rows), T + 1), self.pad_id, np.int32)
        attention = np.zeros((len(rows), T), np.int32)
        loss = np.zeros((len(rows), T), np.float32)
        for i, (shard, start, prompt_len, total_len) in enumerate(rows.tolist()):
            n = min(total_len, T + 1)
            w[i, :n] = self.split.shards[shard][start : start + n]
            attention[i, : n - 1] = 1
            # Target t is token t + 1: it counts when it belongs to the completion.
            loss[i, max(prompt_len - 1, 0) : n - 1] = 1
        return Batch(w[:, :-1], w[:, 1:], attention_mask=attention, loss_mask=loss)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            n = len(self.split.examples)
            order = np.arange(n)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._order = (epoch, order)
        return self._order[1]
