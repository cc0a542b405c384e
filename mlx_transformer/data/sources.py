"""Reading `prepare`'s sources: finding text and JSONL files and checking them (pass 1).

Bad data is reported with its place: `path: invalid UTF-8 at byte N (line L)` in text files,
`path:line: ...` in JSONL. The dataset layout this feeds is described in prepare.py.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl",)
BLOCK_BYTES = 1 << 20  # unit of reading and of work sent to the pool


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
        elif path.exists():
            raise UserError(
                f"--data path {path} is neither a file nor a folder (a device or a pipe?); "
                "give text files or folders of them"
            )
        else:
            raise UserError(f"--data path {path} does not exist")
    return files


class _Reader:
    """Reads the sources as one stream of (doc, source, payload, where, last) pieces.

    A text file is one document, read in blocks: payload = raw bytes, where = byte offset. A JSONL
    line is one document: payload = its fields (dict), where = line number. `last` marks the
    final piece of a document; `doc` counts documents from 0 (empty files are skipped).
    """

    def __init__(self, sources: list[Path], replace_invalid_utf8: bool, tokenizer: Any = None):
        self.sources = sources
        self.errors = "replace" if replace_invalid_utf8 else "strict"
        self.tokenizer = tokenizer  # renders chat records; None: they are refused

    def chat_examples(self, messages: list[dict], where: str) -> list[tuple[str, str, bool]]:
        """A chat record's (prompt, completion, eos after it?) examples, one per assistant turn."""
        from ..chat import chat_examples, ends_with_eos

        if self.tokenizer is None:
            raise UserError(
                f'{where}: chat data ({{"messages": ...}}) is rendered with the model\'s chat '
                "template: pass --tokenizer CKPT (the checkpoint, or its tokenizer.json)"
            )
        pairs = chat_examples(self.tokenizer, messages, where)
        return [(p, c, not ends_with_eos(self.tokenizer, c)) for p, c in pairs]

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


def _check_record(record: Any, path: Path, line_no: int) -> dict[str, Any]:
    fields = None
    if isinstance(record, dict):
        if "messages" in record:
            from ..chat import check_messages

            return {"messages": check_messages(record["messages"], f"{path}:{line_no}")}
        if "prompt" in record and "completion" in record:
            fields = {"prompt": record["prompt"], "completion": record["completion"]}
        elif "text" in record:
            fields = {"text": record["text"]}
    if fields is None or not all(isinstance(v, str) for v in fields.values()):
        raise UserError(
            f'{path}:{line_no}: expected a JSON object with a string "text" field, string '
            '"prompt" and "completion" fields, or "messages" (a chat)'
        )
    return fields


def _char_start(data: bytes | bytearray, i: int) -> int:
    """The start of the UTF-8 character that holds byte i."""
    while i > 0 and data[i] & 0xC0 == 0x80:
        i -= 1
    return i


def _text_bytes(fields: dict[str, Any]) -> int:
    if "messages" in fields:
        return sum(len(m["content"].encode("utf-8")) for m in fields["messages"])
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
                elif "messages" in payload:  # checked by rendering; nothing to train a tokenizer
                    self._set_kind("finetune", path, where)
                    self.reader.chat_examples(payload["messages"], f"{path}:{where}")
                    doc_bytes += _text_bytes(payload)
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
                '(pretraining) or {"prompt", "completion"} / {"messages"} examples (fine-tuning)'
            )


# --- progress (shared with prepare_encode) -------------------------------------------------


@contextlib.contextmanager
def _progress(total: int, desc: str, verbose: bool) -> Iterator[Any]:
    """A tqdm bar in bytes (shows MB/s) when verbose and stderr is a terminal (a log gets none).

    An error clears the bar, so the error's line that follows stands alone.
    """
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000,
               file=sys.stderr, dynamic_ncols=True, disable=None if verbose else True)  # fmt: skip
    try:
        yield bar
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()
