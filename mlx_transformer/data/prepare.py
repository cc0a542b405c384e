"""`mlx-transformer prepare`: text files -> tokenizer.model + token shards + manifest.json.

Inputs (`--data`, any mix; none = the embedded Tiny Shakespeare):
  - text files; folders are searched recursively for TEXT_SUFFIXES (hidden entries skipped);
  - JSONL files (`.jsonl`), one JSON object per line: `{"text": ...}` for pretraining, or
    `{"prompt": ..., "completion": ...}` or a chat, `{"messages": [{"role", "content"}, ...]}`,
    for fine-tuning (a dataset is one kind or the other). Chats are rendered with the chat
    template of `--tokenizer` (see `mlx_transformer.chat`): one example per assistant turn.

Output folder (written to a temporary sibling, renamed into place at the end; it must be new or
empty, or a dataset written here — replaced only with --overwrite, or left as is when it already
holds the very dataset asked for):
  manifest.json        what data.load_dataset() reads; see `_manifest` for the schema
  tokenizer.model      the sentencepiece model, byte for byte (or, with a Hugging Face
                       --tokenizer, tokenizer.json and its config files)
  {split}_{k:03d}.bin  token ids, raw little-endian uint16 (vocab <= 65536) or uint32
  {split}_{k:03d}.idx.bin  fine-tuning only: int64 rows (start, prompt_len, total_len)

Documents are files (text) or lines (JSONL); each is followed by eos. The validation split is
whole documents spread evenly through the corpus; a corpus of one document is instead cut at
the line end after (1 - val_fraction) of its bytes. Fine-tuning examples store
prompt ids + completion ids + eos; the loss covers the completion and eos (a chat turn that
the template already ends with eos gets none added). A prompt starts with BOS where a Hugging
Face tokenizer adds one, as the generation prompt does; a chat's comes from its template.

Two passes over the data keep memory bounded whatever the corpus size: the first checks it
(UTF-8, JSON), counts documents and feeds sentencepiece's sampled training; the second encodes
~1 MB blocks on a process pool, in order, appending to the shards as results arrive.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import atomic
from ..errors import UserError
from ..tokenizer import MODEL_TYPES, SPECIAL_IDS, Tokenizer
from ..tokenizer_files import TOKENIZER_FILES, load_tokenizer
from .dataset import FORMAT_VERSION, KINDS, MANIFEST, default_corpus_path
from .encode import _encode
from .sources import TEXT_SUFFIXES, _Reader, _Scan, find_sources
from .tokenizer_training import train_tokenizer

SHARD_TOKENS = 100_000_000  # tokens per shard file (200 MB as uint16)
# Vocabulary sizes: the pieces every tokenizer holds (256 bytes, unk/bos/eos/pad, the newline)
# come first, so fewer cannot work; above 2**20 (4x the largest vocabularies in use, ~256k) is a
# typo. Between the two, sentencepiece says what the corpus supports.
BASE_PIECES = 256 + len(SPECIAL_IDS) + 1
MAX_VOCAB_SIZE = 1 << 20

# What `prepare` may replace: a dataset it wrote (one from before the marker is recognised by its
# manifest's format fields, not by the file name alone).
DATASET = atomic.FolderKind(
    "dataset",
    entries=(MANIFEST, *TOKENIZER_FILES, "train_*.bin", "val_*.bin"),
    legacy=(
        MANIFEST,
        lambda m: (
            m.get("format_version") == FORMAT_VERSION
            and m.get("kind") in KINDS
            and isinstance(m.get("request"), dict)
            and isinstance(m.get("splits"), dict)
        ),
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", metavar="PATH", help=(
        "text files, folders of them (" + ", ".join(TEXT_SUFFIXES) + ", searched recursively) "
        "or .jsonl files of {\"text\"} or {\"prompt\", \"completion\"}; default: Tiny Shakespeare"
    ))  # fmt: skip
    parser.add_argument("--out", required=True, metavar="DIR", help="dataset folder to write")
    parser.add_argument("--vocab-size", type=int, default=8000, help="tokenizer vocabulary size")
    parser.add_argument("--tokenizer", metavar="CKPT", help=(
        "encode with this tokenizer instead of training one: a checkpoint or dataset folder, a "
        "tokenizer.model or a tokenizer.json (needed for chat data: its chat template)"
    ))  # fmt: skip
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share held out")
    parser.add_argument("--special-tokens", nargs="+", default=[], metavar="TOKEN")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a different dataset that prepare wrote at --out")  # fmt: skip
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
        out: The dataset folder: new or empty. If it already holds this very dataset (same
            sources, sizes, times and options), nothing is done; a different dataset is replaced
            only with `overwrite`; anything else (a file, a folder of other files) never.
        vocab_size, model_type, special_tokens: Tokenizer training (ignored with `tokenizer`).
        tokenizer: A tokenizer to encode with instead of training one: a folder holding one
            (a checkpoint), a tokenizer.model or a tokenizer.json. Chat data needs it.
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
    if tokenizer is None:
        _check_vocab_size(vocab_size, special_tokens)
    out = Path(out)
    sources = find_sources(data or [default_corpus_path()])
    reused = load_tokenizer(tokenizer) if tokenizer is not None else None
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
    if existing is not None and not overwrite:  # what check_output would say, more precisely
        raise UserError(
            f"{out} holds a different dataset (other sources or options); pass --overwrite to "
            "replace it, or choose another --out"
        )
    inputs = [*sources, tokenizer]
    # Refused outputs fail here, before any reading; write_folder checks again.
    atomic.check_output(out, DATASET, overwrite=overwrite, inputs=inputs)

    manifest: dict[str, Any] = {}  # filled in by fill()

    def fill(tmp: Path) -> None:
        reader = _Reader(sources, replace_invalid_utf8, reused)
        scan = _Scan(reader, verbose)
        texts = scan.texts()  # pass 1, run by tokenizer training as it reads
        try:
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
        finally:
            texts.close()  # ends its progress bar now, before an error line is printed
        for name, content in tok.files.items():
            (tmp / name).write_bytes(content)
        splits, dtype = _encode(
            reader, scan, tok, tmp, val_fraction, shard_tokens, workers, verbose
        )
        manifest.update(_manifest(reader, scan, tok, splits, dtype, request))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    atomic.write_folder(out, fill, DATASET, overwrite=overwrite, inputs=inputs)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    _say(verbose, (
        f"wrote {out}: {manifest['kind']}, train {train['tokens']:,} tokens ({train['bytes']:,} "
        f"bytes), val {val['tokens']:,} tokens ({val['bytes']:,} bytes); "
        f"vocab {manifest['vocab_size']} ({manifest['tokenizer']['model_type']}), "
        f"{manifest['dtype']}"
    ))  # fmt: skip
    return manifest


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
    return {
        "format_version": FORMAT_VERSION,
        "kind": scan.kind,
        "dtype": dtype,
        "vocab_size": tok.vocab_size,
        "tokenizer": {
            "file": next(iter(tok.files)),  # tokenizer.model, or tokenizer.json (+ its config)
            "sha256": tok.checksum,
            "model_type": tok.model_type,
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
    """The manifest of a dataset prepare wrote at `out`, if there is one holding nothing else."""
    if out.is_symlink() or not out.is_dir() or not DATASET.holds(out) or DATASET.foreign(out):
        return None
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None  # check_output says what is wrong


def _check_vocab_size(vocab_size: int, special_tokens: Sequence[str]) -> None:
    """Refuse sizes sentencepiece cannot train, before it reads the corpus (and reports them
    with its own internals, or not at all)."""
    smallest = BASE_PIECES + len(special_tokens)
    if vocab_size < smallest:
        raise UserError(
            f"--vocab-size {vocab_size} is too small: every vocabulary holds {smallest} pieces "
            f"(256 bytes, 4 special ids, the newline, {len(special_tokens)} special tokens) "
            "before any of the corpus' own; pass a few thousand (the default is 8000)"
        )
    if vocab_size > MAX_VOCAB_SIZE:
        raise UserError(
            f"--vocab-size {vocab_size} is too large: the limit is {MAX_VOCAB_SIZE:,} (2**20); "
            "8000 to 32000 suit most corpora, and a small corpus supports fewer (prepare says "
            "how many)"
        )


def _say(verbose: bool, message: str) -> None:
    if verbose:
        print(message, file=sys.stderr)
