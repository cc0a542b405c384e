"""`mlx-transformer prepare`: text files -> tokenizer.model + token shards + manifest.json.

Inputs (`--data`, any mix; none = the embedded Tiny Shakespeare):
  - text files; folders are searched recursively for TEXT_SUFFIXES (hidden entries skipped);
  - JSONL files (`.jsonl`), one JSON object per line: `{"text": ...}` for pretraining, or
    `{"prompt": ..., "completion": ...}` for fine-tuning (a dataset is one kind or the other).

Output folder (written to a temporary sibling, renamed into place at the end):
  manifest.json        what data.load_dataset() reads; see `_manifest` for the schema
  tokenizer.model      the sentencepiece model, byte for byte
  {split}_{k:03d}.bin  token ids, raw little-endian uint16 (vocab <= 65536) or uint32
  {split}_{k:03d}.idx.bin  fine-tuning only: int64 rows (start, prompt_len, total_len)

Documents are files (text) or lines (JSONL); each is followed by eos. The validation split is
whole documents spread evenly through the corpus; a corpus of one document is instead cut at
the line end after (1 - val_fraction) of its bytes. Fine-tuning examples store
prompt ids + completion ids + eos; the loss covers the completion and eos.

Two passes over the data keep memory bounded whatever the corpus size: the first checks it
(UTF-8, JSON), counts documents and feeds sentencepiece's sampled training; the second encodes
~1 MB blocks on a process pool, in order, appending to the shards as results arrive.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import multiprocessing
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .data import FORMAT_VERSION, MANIFEST, default_corpus_path
from .errors import UserError
from .tokenizer import MODEL_TYPES, Tokenizer, train_tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl",)
BLOCK_BYTES = 1 << 20  # unit of reading and of work sent to the pool
SHARD_TOKENS = 100_000_000  # tokens per shard file (200 MB as uint16)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", metavar="PATH", help=(
        "text files, folders of them (" + ", ".join(TEXT_SUFFIXES) + ", searched recursively) "
        "or .jsonl files of {\"text\"} or {\"prompt\", \"completion\"}; default: Tiny Shakespeare"
    ))  # fmt: skip
    parser.add_argument("--out", required=True, metavar="DIR", help="dataset folder to write")
    parser.add_argument("--vocab-size", type=int, default=8000, help="tokenizer vocabulary size")
    parser.add_argument("--tokenizer", metavar="MODEL", help="reuse this tokenizer.model")
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share held out")
    parser.add_argument("--special-tokens", nargs="+", default=[], metavar="TOKEN")
    parser.add_argument("--overwrite", action="store_true", help="replace a different dataset")
    parser.add_argument("--replace-invalid-utf8", action="store_true",
                        help="read invalid UTF-8 bytes as U+FFFD instead of failing")  # fmt: skip
    parser.add_argument("--workers", type=int, default=None, help="encoding processes")


def run(args: argparse.Namespace) -> int:
    prepare(
        args.data,
        args.out,
        vocab_size=args.vocab_size,
        tokenizer=args.tokenizer,
        model_type=args.model_type,
        val_fraction=args.val_fraction,
        special_tokens=args.special_tokens,
        overwrite=args.overwrite,
        replace_invalid_utf8=args.replace_invalid_utf8,
        workers=args.workers,
        verbose=True,
    )
    return 0


def prepare(
    data: Sequence[str | Path] | None,
    out: str | Path,
    *,
    vocab_size: int = 8000,
    tokenizer: str | Path | None = None,
    model_type: str = "bpe",
    val_fraction: float = 0.1,
    special_tokens: Sequence[str] = (),
    overwrite: bool = False,
    replace_invalid_utf8: bool = False,
    workers: int | None = None,
    shard_tokens: int = SHARD_TOKENS,
    input_sentence_size: int = 2_000_000,
    verbose: bool = False,
) -> dict[str, Any]:
    """Build a dataset folder from text; see the module docstring for the layout.

    Args:
        data: Files and folders; None or empty uses the embedded Tiny Shakespeare.
        out: The dataset folder. If it already holds this very dataset (same sources, sizes,
            times and options), nothing is done; a different one needs `overwrite`.
        vocab_size, model_type, special_tokens: Tokenizer training (ignored with `tokenizer`).
        tokenizer: A sentencepiece model to reuse instead of training one.
        val_fraction: Share of the data held out for validation, in [0, 1).
        replace_invalid_utf8: Decode invalid bytes as U+FFFD instead of raising.
        workers: Encoding processes (default: all CPUs).
        shard_tokens: Tokens per shard file.
        input_sentence_size: Lines sampled from the corpus to train the tokenizer.
        verbose: Progress bars and a summary on stderr.

    Returns:
        The manifest (also written to `out/manifest.json`).
    """
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise UserError(f"shard_tokens must be positive, got {shard_tokens}")
    out = Path(out)
    sources = find_sources(data or [default_corpus_path()])
    reused = Tokenizer.load(tokenizer) if tokenizer is not None else None
    request = {
        "sources": [{"path": str(p.resolve()), "bytes": s.st_size, "mtime_ns": s.st_mtime_ns}
                    for p, s in ((p, p.stat()) for p in sources)],
        "tokenizer": reused.checksum if reused else {
            "vocab_size": vocab_size, "model_type": model_type,
            "special_tokens": list(special_tokens), "input_sentence_size": input_sentence_size},
        "val_fraction": val_fraction,
        "replace_invalid_utf8": replace_invalid_utf8,
        "shard_tokens": shard_tokens,
    }  # fmt: skip
    existing = _existing_manifest(out)
    if existing is not None and existing.get("request") == request and not overwrite:
        _say(verbose, f"{out} already holds this dataset; nothing to do")
        return existing
    if existing is not None and not overwrite:
        raise UserError(
            f"{out} holds a different dataset (other sources or options); pass --overwrite to "
            "replace it, or choose another --out"
        )

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out)
        tmp.mkdir()
        reader = _Reader(sources, replace_invalid_utf8)
        scan = _Scan(reader, verbose)
        texts = scan.texts()  # pass 1, run by tokenizer training as it reads
        if reused is None:
            tok = train_tokenizer(
                texts,
                vocab_size=vocab_size,
                model_type=model_type,
                special_tokens=special_tokens,
                input_sentence_size=input_sentence_size,
            )
        else:
            tok = reused
        collections.deque(texts, maxlen=0)  # finish checking and counting, if training stopped
        (tmp / "tokenizer.model").write_bytes(tok.model_bytes)
        splits, dtype = _encode(
            reader, scan, tok, tmp, val_fraction, shard_tokens, workers, verbose
        )
        manifest = _manifest(reader, scan, tok, splits, dtype, request)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    _say(verbose, (
        f"wrote {out}: {manifest['kind']}, train {train['tokens']:,} tokens ({train['bytes']:,} "
        f"bytes), val {val['tokens']:,} tokens ({val['bytes']:,} bytes); vocab {tok.vocab_size} "
        f"({manifest['tokenizer']['model_type']}), {manifest['dtype']}"
    ))  # fmt: skip
    return manifest


# --- sources and reading -------------------------------------------------------------------


def find_sources(paths: Sequence[str | Path]) -> list[Path]:
    """Expand `paths` into a sorted list of readable text/JSONL files (folders recursively)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                kinds = ", ".join(TEXT_SUFFIXES + JSONL_SUFFIXES)
                raise UserError(
                    f"folder {path} holds no text files ({kinds}); point --data at files or "
                    "folders containing them"
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"--data path {path} does not exist")
    return files


class _Reader:
    """Reads the sources as one stream of (doc, source, payload, where, last) pieces.

    A text file is one document, read in blocks: payload = raw bytes, where = byte offset. A JSONL
    line is one document: payload = its fields (dict), where = line number. `last` marks the
    final piece of a document; `doc` counts documents from 0 (empty files are skipped).
    """

    def __init__(self, sources: list[Path], replace_invalid_utf8: bool):
        self.sources = sources
        self.errors = "replace" if replace_invalid_utf8 else "strict"

    def pieces(self) -> Iterator[tuple[int, int, bytes | dict[str, str], int, bool]]:
        doc = 0
        for source, path in enumerate(self.sources):
            if path.suffix.lower() in JSONL_SUFFIXES:
                for fields, line_no in self._jsonl(path):
                    yield doc, source, fields, line_no, True
                    doc += 1
            else:
                blocks = self._blocks(path)
                block = next(blocks, None)
                if block is None:
                    continue  # an empty file is no document
                while block is not None:
                    following = next(blocks, None)
                    yield doc, source, block[0], block[1], following is None
                    block = following
                doc += 1

    def decode(self, raw: bytes, path: Path, offset: int, lines_before: int) -> str:
        try:
            return raw.decode("utf-8", self.errors)
        except UnicodeDecodeError as e:
            line = lines_before + raw.count(b"\n", 0, e.start) + 1
            raise UserError(
                f"{path}: invalid UTF-8 at byte {offset + e.start} (line {line}); fix the file "
                "or pass --replace-invalid-utf8 to read bad bytes as U+FFFD"
            ) from None

    @staticmethod
    def _blocks(path: Path) -> Iterator[tuple[bytes, int]]:
        """(block, offset): ~BLOCK_BYTES blocks that end after a newline (or at EOF).

        A newline byte never occurs inside a UTF-8 multi-byte sequence, so blocks decode alone
        (and tokens never span a newline, so blocks encode alone). A line longer than 4 blocks
        is cut at a character boundary.
        """
        with open(path, "rb") as f:
            buf, offset = bytearray(), 0
            while chunk := f.read(BLOCK_BYTES):
                buf += chunk
                cut = buf.rfind(b"\n") + 1
                if cut == 0 and len(buf) >= 4 * BLOCK_BYTES:
                    cut = _char_start(buf, len(buf) - 1)
                if cut:
                    yield bytes(buf[:cut]), offset
                    offset += cut
                    del buf[:cut]
            if buf:
                yield bytes(buf), offset

    def _jsonl(self, path: Path) -> Iterator[tuple[dict[str, str], int]]:
        with open(path, "rb") as f:
            offset = 0
            for line_no, raw in enumerate(f, 1):
                line = self.decode(raw, path, offset, line_no - 1)
                offset += len(raw)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
                yield _check_record(record, path, line_no), line_no


def _check_record(record: Any, path: Path, line_no: int) -> dict[str, str]:
    fields = None
    if isinstance(record, dict):
        if "prompt" in record and "completion" in record:
            fields = {"prompt": record["prompt"], "completion": record["completion"]}
        elif "text" in record:
            fields = {"text": record["text"]}
    if fields is None or not all(isinstance(v, str) for v in fields.values()):
        raise UserError(
            f'{path}:{line_no}: expected a JSON object with a string "text" field, or string '
            '"prompt" and "completion" fields'
        )
    return fields


def _char_start(data: bytes | bytearray, i: int) -> int:
    """The start of the UTF-8 character that holds byte i."""
    while i > 0 and data[i] & 0xC0 == 0x80:
        i -= 1
    return i


def _text_bytes(fields: dict[str, str]) -> int:
    return sum(len(v.encode("utf-8")) for v in fields.values())


# --- pass 1: check, count, and feed tokenizer training ------------------------------------


class _Scan:
    """Reads every piece once: checks it, counts documents and bytes, yields text to train on."""

    def __init__(self, reader: _Reader, verbose: bool):
        self.reader = reader
        self.verbose = verbose
        self.kind: str | None = None
        self.documents = 0
        self.last_doc_bytes = 0  # a one-document corpus is split by bytes
        self.source_bytes = [0] * len(reader.sources)
        self.source_documents = [0] * len(reader.sources)

    def texts(self) -> Iterator[str]:
        total = sum(p.stat().st_size for p in self.reader.sources)
        lines_before, doc_bytes = 0, 0
        with _progress(total, "reading", self.verbose) as bar:
            for doc, source, payload, where, last in self.reader.pieces():
                path = self.reader.sources[source]
                if isinstance(payload, bytes):
                    lines_before = 0 if where == 0 else lines_before
                    text = self.reader.decode(payload, path, where, lines_before)
                    lines_before += payload.count(b"\n")
                    self._set_kind("pretrain", path, None)
                    doc_bytes += len(payload)
                    bar.update(len(payload))
                    yield text
                else:
                    kind = "finetune" if "prompt" in payload else "pretrain"
                    self._set_kind(kind, path, where)
                    doc_bytes += _text_bytes(payload)
                    yield from payload.values()
                if last:
                    self.documents = doc + 1
                    self.last_doc_bytes, doc_bytes = doc_bytes, 0
                    self.source_documents[source] += 1
                    self.source_bytes[source] += self.last_doc_bytes
        if sum(self.source_bytes) == 0:
            names = ", ".join(str(p) for p in self.reader.sources[:3])
            raise UserError(f"the corpus is empty: no text in {names}; check --data")

    def _set_kind(self, kind: str, path: Path, line_no: int | None) -> None:
        if self.kind is None:
            self.kind = kind
        elif self.kind != kind:
            where = f"{path}:{line_no}" if line_no else str(path)
            raise UserError(
                f"{where}: {kind} data mixed with {self.kind} data; a dataset is either text "
                '(pretraining) or {"prompt", "completion"} examples (fine-tuning)'
            )


# --- pass 2: encode in parallel, in order, into shards -------------------------------------


def _tasks(reader: _Reader, scan: _Scan, val_fraction: float) -> Iterator[tuple[str, tuple]]:
    """(split, task) in corpus order; a task is ~BLOCK_BYTES of one split.

    Pretraining items are (text or raw bytes, eos after it?); fine-tuning items are
    (prompt, completion).
    """
    n = scan.documents
    n_val = 0 if val_fraction == 0 or n < 2 else min(max(round(val_fraction * n), 1), n - 1)
    cut = round(scan.last_doc_bytes * (1 - val_fraction)) if n == 1 and val_fraction else None
    items: list = []
    split, size = "train", 0
    for doc, _source, payload, where, last in reader.pieces():
        # Validation documents spread evenly: doc i is in val when i * n_val / n crosses an integer.
        doc_split = "val" if (doc + 1) * n_val // n > doc * n_val // n else "train"
        if scan.kind == "finetune":
            parts = [(doc_split, (payload["prompt"], payload["completion"]))]
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


def _init_worker(model_bytes: bytes, dtype: str, errors: str) -> None:
    _WORKER.update(tok=Tokenizer(model_bytes), dtype=np.dtype(dtype), errors=errors)


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
    for prompt, completion in items:
        p, c = tok.encode(prompt), tok.encode(completion, eos=True)
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
            ids[:take].tofile(self._files[0])
            shard["tokens"] += take
            self.tokens += take
            ids = ids[take:]

    def add_examples(self, ids: np.ndarray, lens: np.ndarray) -> None:
        start = 0
        for prompt_len, total_len in lens.tolist():
            shard = self._shard_with_room(total_len)  # an example never straddles two shards
            np.array([shard["tokens"], prompt_len, total_len], np.int64).tofile(self._files[1])
            ids[start : start + total_len].tofile(self._files[0])
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
    initargs = (tok.model_bytes, dtype.str, reader.errors)
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


# --- manifest and the output folder --------------------------------------------------------


def _manifest(
    reader: _Reader, scan: _Scan, tok: Tokenizer, splits: dict, dtype: str, request: dict
) -> dict[str, Any]:
    """The dataset's description; data.load_dataset() checks it.

    format_version: 1; kind: "pretrain" | "finetune"; dtype: "uint16" | "uint32"; vocab_size;
    tokenizer: {file, sha256, model_type, vocab_size, special_ids, user_defined_tokens};
    document_separator: "eos"; split_by: "document" | "stream"; val_fraction;
    sources: [{path, bytes, documents}];
    splits: {train | val: {tokens, bytes (UTF-8 text, for bits per byte),
        documents (those ending in the split) | examples, completion_tokens, completion_bytes,
        shards: [{file, tokens[, index, examples]}]}};
    request: the sources (size, mtime) and options asked for, to recognise a rerun.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tok.model_bytes)
    model_type = pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()
    return {
        "format_version": FORMAT_VERSION,
        "kind": scan.kind,
        "dtype": dtype,
        "vocab_size": tok.vocab_size,
        "tokenizer": {
            "file": "tokenizer.model",
            "sha256": tok.checksum,
            "model_type": model_type,
            "vocab_size": tok.vocab_size,
            "special_ids": tok.special_ids,
            "user_defined_tokens": tok.user_defined_tokens(),
        },
        "document_separator": "eos",
        "split_by": "stream" if scan.documents == 1 and scan.kind == "pretrain" else "document",
        "val_fraction": request["val_fraction"],
        "sources": [
            {"path": str(path), "bytes": nbytes, "documents": docs}
            for path, nbytes, docs in zip(
                reader.sources, scan.source_bytes, scan.source_documents, strict=True
            )
        ],
        "splits": splits,
        "request": request,
    }


def _existing_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of a dataset already at `out`; None if `out` is absent or an empty folder."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder path")
    if not any(out.iterdir()):
        return None
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        raise UserError(
            f"--out {out} is a non-empty folder that holds no dataset (no readable {MANIFEST}); "
            "choose another --out (prepare replaces only datasets it wrote)"
        ) from None


def _remove_stale_temporaries(out: Path) -> None:
    """Remove temporary siblings of `out` left by a prepare that was killed (its pid is gone)."""
    for path in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = path.name[len(out.name) + 2 :].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier call in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`, replacing what was there with two renames."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _progress(total: int, desc: str, verbose: bool) -> Any:
    """A tqdm bar in bytes (shows MB/s), or nothing when quiet."""
    if not verbose:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000,
                file=sys.stderr, dynamic_ncols=True)  # fmt: skip


def _say(verbose: bool, message: str) -> None:
    if verbose:
        print(message, file=sys.stderr)
