"""Pass 2 of `prepare`: encode the corpus on a process pool, in order, into token shards.

Workers are spawned processes: what they run (`_init_worker`, `_encode_task`) is module-level
here, and importing this module must not import MLX.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..tokenizer import Tokenizer
from ..tokenizer_files import tokenizer_from_files
from .sources import BLOCK_BYTES, _char_start, _progress, _Reader, _Scan

# --- pass 2: encode in parallel, in order, into shards -------------------------------------


def _tasks(reader: _Reader, scan: _Scan, val_fraction: float) -> Iterator[tuple[str, tuple]]:
    """(split, task) in corpus order; a task is ~BLOCK_BYTES of one split.

    Pretraining items are (text or raw bytes, eos after it?); fine-tuning items are
    (prompt, completion, eos after it?, from a chat?): a chat gives one per assistant turn.
    """
    n = scan.documents
    n_val = 0 if val_fraction == 0 or n < 2 else min(max(round(val_fraction * n), 1), n - 1)
    cut = round(scan.last_doc_bytes * (1 - val_fraction)) if n == 1 and val_fraction else None
    items: list = []
    split, size = "train", 0
    for doc, source, payload, where, last in reader.pieces():
        # Validation documents spread evenly: doc i is in val when i * n_val / n crosses an integer.
        doc_split = "val" if (doc + 1) * n_val // n > doc * n_val // n else "train"
        if scan.kind == "finetune" and "messages" in payload:
            examples = reader.chat_examples(
                payload["messages"], f"{reader.sources[source]}:{where}"
            )
            parts = [(doc_split, (*example, True)) for example in examples]
        elif scan.kind == "finetune":
            parts = [(doc_split, (payload["prompt"], payload["completion"], True, False))]
        elif cut is None:
            parts = [
                (doc_split, (payload if isinstance(payload, bytes) else payload["text"], last))
            ]
        else:  # one document: train up to the line end after `cut` bytes, val after
            data = payload if isinstance(payload, bytes) else payload["text"].encode("utf-8")
            offset = where if isinstance(payload, bytes) else 0
            if offset <= cut < offset + len(data):
                at = _cut_point(data, cut - offset)
                parts = [("train", (data[:at], False)), ("val", (data[at:], last))]
            else:
                parts = [("train" if offset + len(data) <= cut else "val", (data, last))]
        for part_split, item in parts:
            if part_split != split and items:
                yield split, (scan.kind, items)
                items, size = [], 0
            split = part_split
            items.append(item)
            size += sum(len(x) for x in item if isinstance(x, (str, bytes)))
            if size >= BLOCK_BYTES:
                yield split, (scan.kind, items)
                items, size = [], 0
    if items:
        yield split, (scan.kind, items)


def _cut_point(data: bytes, at: int) -> int:
    """Where to cut `data` near byte `at`: after the next newline, else at a character start."""
    newline = data.find(b"\n", at)
    return newline + 1 if newline >= 0 else _char_start(data, at)


_WORKER: dict[str, Any] = {}


def _init_worker(files: dict[str, bytes], dtype: str, errors: str) -> None:
    _WORKER.update(tok=tokenizer_from_files(files), dtype=np.dtype(dtype), errors=errors)


def _encode_task(task: tuple[str, list]) -> tuple:
    """Encode one task (in a worker): (ids, text bytes[, (prompt_len, total_len) rows,
    completion bytes])."""
    kind, items = task
    tok, dtype, errors = _WORKER["tok"], _WORKER["dtype"], _WORKER["errors"]
    pieces: list[list[int]] = []
    nbytes = 0
    if kind == "pretrain":
        for data, eos in items:
            text = data.decode("utf-8", errors) if isinstance(data, bytes) else data
            exact = isinstance(data, bytes) and errors == "strict"
            nbytes += len(data) if exact else len(text.encode("utf-8"))
            pieces.extend(tok.encode_lines(text))
            if eos:
                pieces.append([tok.eos_id])
        return _flatten(pieces, dtype), nbytes
    lens, completion_bytes = [], 0
    for prompt, completion, eos, chat in items:
        # A prompt starts as a generation prompt does (BOS where the tokenizer adds one); a
        # chat's rendering holds whatever the template puts there, so it gets none.
        bos = tok.adds_bos and not chat
        p, c = tok.encode(prompt, bos=bos), tok.encode(completion, eos=eos)
        pieces += [p, c]
        lens.append((len(p), len(p) + len(c)))
        completion_bytes += len(completion.encode("utf-8"))
        nbytes += len(prompt.encode("utf-8"))
    nbytes += completion_bytes
    return (
        _flatten(pieces, dtype),
        nbytes,
        np.array(lens, np.int64).reshape(-1, 2),
        completion_bytes,
    )


def _flatten(pieces: list[list[int]], dtype: np.dtype) -> np.ndarray:
    count = sum(map(len, pieces))
    return np.fromiter(itertools.chain.from_iterable(pieces), np.int64, count).astype(dtype)


def _ordered_map(tasks: Iterator, initargs: tuple, workers: int) -> Iterator[tuple[Any, tuple]]:
    """(tag, _encode_task(task)) for (tag, task) in order, on `workers` processes.

    At most 2 tasks per worker are in flight, so memory stays bounded (Pool.imap would read the
    whole input ahead). A worker that dies raises BrokenProcessPool rather than hanging.
    """
    if workers <= 1:
        _init_worker(*initargs)
        for tag, task in tasks:
            yield tag, _encode_task(task)
        return
    # spawn: a clean interpreter per worker (fork is unsafe once threads exist, e.g. tqdm's).
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, ctx, initializer=_init_worker, initargs=initargs) as pool:
        pending: collections.deque = collections.deque()
        try:
            for tag, task in tasks:
                pending.append((tag, pool.submit(_encode_task, task)))
                if len(pending) >= 2 * workers:
                    tag, future = pending.popleft()
                    yield tag, future.result()
            while pending:
                tag, future = pending.popleft()
                yield tag, future.result()
        finally:
            for _, future in pending:
                future.cancel()


def _can_spawn() -> bool:
    """False when spawned workers could not re-import __main__ (a script read from stdin);
    they would die at start-up and leave the pool waiting."""
    main_file = getattr(sys.modules["__main__"], "__file__", None)
    return main_file is None or os.path.exists(main_file)


class _ShardWriter:
    """Appends one split's tokens to {split}_{k:03d}.bin files of at most `shard_tokens` each;
    for fine-tuning also (start, prompt_len, total_len) rows to {split}_{k:03d}.idx.bin."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, finetune: bool):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.finetune = finetune
        self.shards: list[dict[str, Any]] = []
        self.tokens = self.bytes = self.documents = 0
        self.completion_tokens = self.completion_bytes = 0
        self._files: list = []

    def add_tokens(self, ids: np.ndarray) -> None:
        while len(ids):
            shard = self._shard_with_room(1)
            take = min(len(ids), self.shard_tokens - shard["tokens"])
            _write(self._files[0], ids[:take])
            shard["tokens"] += take
            self.tokens += take
            ids = ids[take:]

    def add_examples(self, ids: np.ndarray, lens: np.ndarray) -> None:
        start = 0
        for prompt_len, total_len in lens.tolist():
            shard = self._shard_with_room(total_len)  # an example never straddles two shards
            _write(self._files[1], np.array([shard["tokens"], prompt_len, total_len], np.int64))
            _write(self._files[0], ids[start : start + total_len])
            shard["tokens"] += total_len
            shard["examples"] += 1
            self.tokens += total_len
            self.completion_tokens += total_len - prompt_len
            start += total_len

    def _shard_with_room(self, n: int) -> dict[str, Any]:
        if not self.shards or 0 < self.shards[-1]["tokens"] > self.shard_tokens - n:
            self.close()
            name = f"{self.split}_{len(self.shards):03d}"
            self.shards.append({"file": f"{name}.bin", "tokens": 0})
            self._files = [open(self.folder / f"{name}.bin", "wb")]  # noqa: SIM115
            if self.finetune:
                self.shards[-1].update(index=f"{name}.idx.bin", examples=0)
                self._files.append(open(self.folder / f"{name}.idx.bin", "wb"))  # noqa: SIM115
        return self.shards[-1]

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": self.tokens, "bytes": self.bytes}
        out["examples" if self.finetune else "documents"] = self.documents
        if self.finetune:
            out.update(completion_tokens=self.completion_tokens,
                       completion_bytes=self.completion_bytes)  # fmt: skip
        out["shards"] = self.shards
        return out


def _write(file: Any, array: np.ndarray) -> None:
    """Append `array`'s bytes. Not `ndarray.tofile`: on a full disk it raises an OSError without
    errno ("N requested and M written"), which could not be told from a bug."""
    file.write(memoryview(np.ascontiguousarray(array)).cast("B"))


def _encode(
    reader: _Reader,
    scan: _Scan,
    tok: Tokenizer,
    folder: Path,
    val_fraction: float,
    shard_tokens: int,
    workers: int | None,
    verbose: bool,
) -> tuple[dict[str, dict[str, Any]], str]:
    """Pass 2: encode every document into its split's shards. Returns (split summaries, dtype)."""
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    finetune = scan.kind == "finetune"
    writers = {s: _ShardWriter(folder, s, shard_tokens, finetune) for s in ("train", "val")}
    total = sum(scan.source_bytes)
    workers = workers or os.cpu_count() or 1
    if total < 2 * BLOCK_BYTES or not _can_spawn():
        workers = 1  # starting processes would cost more than it saves
    initargs = (tok.files, dtype.str, reader.errors)
    tasks = _tasks(reader, scan, val_fraction)
    try:
        with _progress(total, "encoding", verbose) as bar:
            for split, result in _ordered_map(tasks, initargs, workers):
                writer = writers[split]
                if finetune:
                    ids, nbytes, lens, completion_bytes = result
                    writer.add_examples(ids, lens)
                    writer.documents += len(lens)
                    writer.completion_bytes += completion_bytes
                else:
                    ids, nbytes = result
                    writer.add_tokens(ids)
                    writer.documents += int(np.count_nonzero(ids == tok.eos_id))
                writer.bytes += nbytes
                bar.update(nbytes)
    finally:
        for writer in writers.values():
            writer.close()
    if writers["train"].tokens == 0:
        raise UserError("the training split came out empty; lower --val-fraction")
    if val_fraction > 0 and writers["val"].tokens == 0:
        raise UserError(
            "the validation split came out empty (the corpus is too small to hold out "
            f"{val_fraction:g} of it); raise --val-fraction, add text, or pass --val-fraction 0"
        )
    return {s: w.summary() for s, w in writers.items()}, dtype.name
