"""Datasets written by `mlx-transformer prepare`, read with numpy only (no MLX).

`load_dataset(dir)` checks manifest.json against the files (and a tokenizer, if given) and
memory-maps the token shards; `batches` turns a `Dataset` into batches.
"""

from __future__ import annotations

import json
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
    from ..tokenizer_files import load_tokenizer  # no MLX there either

    expected = manifest["tokenizer"]["sha256"]
    own = load_tokenizer(path / manifest["tokenizer"]["file"])
    if own.checksum != expected:
        raise UserError(
            f"{own.path} does not match the tokenizer the shards were encoded with "
            f"(sha256 {own.checksum[:12]} vs {expected[:12]} in {MANIFEST}); re-run prepare"
        )
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    if tokenizer.checksum != expected:
        name = tokenizer.path or "the given tokenizer"
        raise UserError(
            f"dataset {path} was encoded with a different tokenizer than {name} (sha256 "
            f"{expected[:12]} vs {tokenizer.checksum[:12]}); use the dataset's tokenizer "
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
