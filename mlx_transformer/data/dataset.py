"""Datasets written by `mlx-transformer prepare`, read with numpy only: checks and batches.

Training converts the numpy batches to `mx.array`; nothing here imports MLX.

- `load_dataset(dir)` checks manifest.json against the files (and a tokenizer, if given) and
  memory-maps the token shards.
- `PretrainBatches`: random windows of context + 1 tokens; inputs = w[:-1], targets = w[1:].
  Batch k depends only on (seed, rank, k), so resuming from `state_dict()` replays exactly.
- `val_windows`: every token of a split once, in order, for evaluation (and bits per byte).
- `FinetuneBatches`: prompt/completion examples, right-padded, with attention and loss masks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("pretrain", "finetune")
DTYPES = ("uint16", "uint32")


def default_corpus_path() -> Path:
    """The embedded corpus: Tiny Shakespeare (1,115,394 bytes), shipped as package data."""
    return Path(__file__).with_name("corpus") / "tinyshakespeare.txt"


# --- the dataset ---------------------------------------------------------------------------


@dataclass
class Split:
    """One split (train or val): its shards memory-mapped, and what the manifest says."""

    name: str
    tokens: int
    bytes: int
    shards: list[np.ndarray]
    # Fine-tuning: one row per example, (shard, start, prompt_len, total_len).
    examples: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes of text per token: bits per byte = loss (nats/token) / ln 2 / this."""
        return self.bytes / self.tokens if self.tokens else float("nan")


@dataclass
class Dataset:
    """A prepared dataset folder."""

    path: Path
    manifest: dict[str, Any]
    splits: dict[str, Split]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def special_ids(self) -> dict[str, int]:
        return self.manifest["tokenizer"]["special_ids"]

    @property
    def pad_id(self) -> int:
        """The padding id (eos for tokenizers without a pad piece)."""
        ids = self.special_ids
        return ids["pad"] if ids["pad"] >= 0 else ids["eos"]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest["tokenizer"]["file"]

    def bytes_per_token(self, split: str = "val") -> float:
        return self.splits[split].bytes_per_token


def load_dataset(path: str | Path, tokenizer: Any = None) -> Dataset:
    """Open a dataset folder written by `prepare`, checking it before training trusts it.

    Args:
        path: The folder holding manifest.json.
        tokenizer: Optional `Tokenizer` (or path to a tokenizer.model) the caller will use; it
            must be the one the dataset was encoded with (same sha256).

    Returns:
        The `Dataset`, with every shard memory-mapped read-only.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(
            f"{path} is not a folder: a dataset is the folder `mlx-transformer prepare --out` "
            "writes; pass that folder"
        )
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"no dataset at {path} (no {MANIFEST}); make one with `mlx-transformer prepare "
            f"--out {path}`"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read {path / MANIFEST}: {e.strerror}") from None
    except ValueError as e:
        raise UserError(f"{path / MANIFEST} is not valid JSON ({e}); re-run prepare") from None
    _check_manifest(path, manifest)
    _check_tokenizer(path, manifest, tokenizer)
    dtype = np.dtype(manifest["dtype"])
    splits = {}
    for name, info in manifest["splits"].items():
        shards, rows = [], []
        for k, shard in enumerate(info["shards"]):
            shards.append(_memmap(path / shard["file"], dtype, shard["tokens"]))
            if manifest["kind"] == "finetune":
                index = _memmap(path / shard["index"], np.dtype(np.int64), 3 * shard["examples"])
                index = np.asarray(index).reshape(-1, 3)
                rows.append(np.column_stack([np.full(len(index), k, np.int64), index]))
        examples = None
        if manifest["kind"] == "finetune":
            examples = np.concatenate(rows) if rows else np.zeros((0, 4), np.int64)
        splits[name] = Split(name, info["tokens"], info["bytes"], shards, examples, info)
    return Dataset(path, manifest, splits)


def _check_manifest(path: Path, m: Any) -> None:
    """Every field load_dataset and training read, with its type: a damaged or foreign
    manifest is one line naming the field, never a KeyError deep inside training."""
    where = path / MANIFEST
    redo = "re-run `mlx-transformer prepare`"
    if not isinstance(m, dict):
        raise UserError(f"{where}: expected a JSON object, found {_json_type(m)}; {redo}")
    if m.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{where}: format version {m.get('format_version')!r}, this version reads "
            f"{FORMAT_VERSION}; {redo}"
        )
    if m.get("kind") not in KINDS or m.get("dtype") not in DTYPES:
        raise UserError(f"{where}: unknown kind or dtype; {redo}")

    def need(obj: Any, key: str, kind: type, name: str) -> Any:
        value = obj.get(key) if isinstance(obj, dict) else None
        if kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        elif kind is str:  # a file name: inside the dataset folder, never a path out of it
            ok = isinstance(value, str) and value not in ("", ".", "..")
            ok = ok and not set(value) & {"/", "\\", "\0"}
        else:
            ok = isinstance(value, kind)
        if not ok:
            what = {int: "a count", str: "a file name", dict: "an object", list: "a list"}[kind]
            raise UserError(f"{where}: {name} is missing or not {what}; {redo}")
        return value

    need(m, "vocab_size", int, "vocab_size")
    tok = need(m, "tokenizer", dict, "tokenizer")
    need(tok, "file", str, "tokenizer.file")
    if not isinstance(tok.get("sha256"), str):
        raise UserError(f"{where}: tokenizer.sha256 is missing or not a string; {redo}")
    ids = need(tok, "special_ids", dict, "tokenizer.special_ids")
    for key in ("eos", "pad"):
        if not isinstance(ids.get(key), int) or isinstance(ids.get(key), bool):
            raise UserError(f"{where}: tokenizer.special_ids.{key} is missing; {redo}")
    splits = need(m, "splits", dict, "splits")
    if "train" not in splits or not set(splits) <= {"train", "val"}:
        raise UserError(f"{where}: splits must be train (and val), found {sorted(splits)}; {redo}")
    for split, info in splits.items():
        need(splits, split, dict, f"splits.{split}")
        for key in ("tokens", "bytes"):
            need(info, key, int, f"splits.{split}.{key}")
        for k, shard in enumerate(need(info, "shards", list, f"splits.{split}.shards")):
            at = f"splits.{split}.shards[{k}]"
            need(shard, "file", str, f"{at}.file")
            need(shard, "tokens", int, f"{at}.tokens")
            if m["kind"] == "finetune":
                need(shard, "index", str, f"{at}.index")
                need(shard, "examples", int, f"{at}.examples")


def _json_type(value: Any) -> str:
    names = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _check_tokenizer(path: Path, manifest: dict[str, Any], tokenizer: Any) -> None:
    from ..tokenizer import Tokenizer  # no MLX there either

    expected = manifest["tokenizer"]["sha256"]
    own = Tokenizer.load(path / manifest["tokenizer"]["file"])
    if own.checksum != expected:
        raise UserError(
            f"{own.path} does not match the tokenizer the shards were encoded with "
            f"(sha256 {own.checksum[:12]} vs {expected[:12]} in {MANIFEST}); re-run prepare"
        )
    if tokenizer is None:
        return
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.load(tokenizer)
    if tokenizer.checksum != expected:
        name = tokenizer.path or "the given tokenizer"
        raise UserError(
            f"dataset {path} was encoded with a different tokenizer than {name} (sha256 "
            f"{expected[:12]} vs {tokenizer.checksum[:12]}); use the dataset's tokenizer.model "
            "or re-run prepare with --tokenizer pointing at yours"
        )


def _memmap(file: Path, dtype: np.dtype, count: int) -> np.ndarray:
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        raise UserError(f"dataset file {file} is missing; re-run prepare") from None
    if size != count * dtype.itemsize:
        raise UserError(
            f"{file} holds {size} bytes, the manifest says {count} x {dtype.itemsize}; "
            "the dataset is damaged, re-run prepare"
        )
    if count == 0:
        return np.zeros(0, dtype)  # np.memmap refuses empty files
    return np.memmap(file, dtype=dtype, mode="r")


# --- batches -------------------------------------------------------------------------------


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
