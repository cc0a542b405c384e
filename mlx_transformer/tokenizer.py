"""The tokenizer: a thin, exact wrapper over a sentencepiece model, and streaming decoding.

Imports no MLX: the ONNX side (numpy + onnxruntime + sentencepiece) uses this module as is.

Models trained here round-trip exactly: `decode(encode(text)) == text` for any Unicode string.
That takes a few choices, made by `data.tokenizer_training` and recorded in the model file:

- `normalization_rule_name="identity"`, `remove_extra_whitespaces=False`, `add_dummy_prefix=False`:
  sentencepiece neither rewrites characters nor adds or drops spaces.
- `byte_fallback=True`: a character the vocabulary lacks becomes its UTF-8 bytes (`<0xE2>` ...),
  never `<unk>`.
- `"\\n"` is a user-defined piece, so newlines survive and no piece spans one.
- Fixed special ids: unk=0, bos=1, eos=2, pad=3; newline=4; user special tokens follow.

Three wrinkles of sentencepiece are handled in `Tokenizer.encode`: its BPE segmentation of a long
string depends slightly on text far away, so we encode line by line (a line's tokens depend only on
the line, and a corpus encodes the same however it is chunked); a literal U+2581 ("▁") in the
text would decode as a space, so we encode it as its three bytes; and it refuses lone surrogates,
which is how Python hands over bytes that were not UTF-8 (command-line arguments, and stdin read
with `surrogateescape`, as `generate.rules.read_prompt` does): each such byte becomes its byte
piece, the original byte, where the model has byte fallback; without it the text is refused with
the byte's offset. MLX and ONNX generation both encode here, so they agree.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from .errors import UserError

# The sentencepiece model's file name in checkpoint and dataset folders.
TOKENIZER_FILE = "tokenizer.model"
SPECIAL_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
NEWLINE_PIECE = "\n"
MODEL_TYPES = ("bpe", "unigram", "char")

_SPACE = "\u2581"  # sentencepiece's visible space, "▁"
_SPACE_BYTES = _SPACE.encode("utf-8")
_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")
_SURROGATES = re.compile("[\ud800-\udfff]+")
# `surrogateescape` turns an undecodable byte b (0x80..0xFF) into the lone surrogate U+DC00 + b.
_ESCAPED_BYTES = range(0xDC80, 0xDD00)


class Tokenizer:
    """A sentencepiece model with exact encode/decode and the ids training and generation need."""

    def __init__(self, model_bytes: bytes, path: Path | None = None):
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        except RuntimeError as e:
            where = path if path is not None else "the given bytes"
            raise UserError(
                f"{where} is not a sentencepiece model ({e}); pass a tokenizer.model written by "
                "`mlx-transformer prepare` or sentencepiece"
            ) from None
        self.model_bytes = model_bytes
        self.path = path
        self.checksum = hashlib.sha256(model_bytes).hexdigest()
        self._tables: _DecodeTables | None = None  # built on first streaming use
        self._newline_id = self._sp.piece_to_id(NEWLINE_PIECE)
        if self._newline_id == self._sp.unk_id():
            self._newline_id = -1
        # The 256 byte pieces by byte value, when the model has byte fallback; else None.
        byte_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
        self._byte_ids = byte_ids if all(self._sp.is_byte(i) for i in byte_ids) else None
        # The three byte pieces of "▁".
        self._space_byte_ids = [byte_ids[b] for b in _SPACE_BYTES] if self._byte_ids else None

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load `path`, a sentencepiece `.model` file or a folder holding `tokenizer.model`."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UserError(
                f"tokenizer file {path} not found; pass a tokenizer.model (e.g. from a dataset "
                "made by `mlx-transformer prepare`, or a checkpoint folder)"
            ) from None
        except OSError as e:
            raise UserError(f"cannot read tokenizer file {path}: {e.strerror}") from None
        return cls(data, path)

    # --- ids -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        """The begin-of-sequence id, or -1 if the model has none."""
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        """The end-of-sequence id (also the document separator in datasets), or -1 if none."""
        return self._sp.eos_id()

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The ids generation stops at: EOS alone (none without one)."""
        return (self.eos_id,) if self.eos_id >= 0 else ()

    @property
    def pad_id(self) -> int:
        """The padding id; models trained here have pad=3. Foreign models may say -1."""
        return self._sp.pad_id()

    @property
    def special_ids(self) -> dict[str, int]:
        """{"unk": .., "bos": .., "eos": .., "pad": ..}; -1 where the model lacks one."""
        return {"unk": self.unk_id, "bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id}

    def check_fits(self, vocab_size: int) -> None:
        """Refuse a model with fewer embeddings than this tokenizer has ids: its ids would index
        past the embedding table (MLX does not check; onnxruntime fails mid-run)."""
        if self.vocab_size > vocab_size:
            where = self.path if self.path is not None else "the tokenizer"
            raise UserError(
                f"{where} has {self.vocab_size} ids but the model only {vocab_size} embeddings: "
                "they do not belong together; use the tokenizer the model was trained with"
            )

    # No chat template: chat needs a Hugging Face tokenizer (see `chat.render_chat`).
    chat_template: str | None = None
    # Prompts are encoded without BOS: training data has none (documents end with EOS).
    adds_bos = False

    @property
    def files(self) -> dict[str, bytes]:
        """{file name: content}: what a folder holding this tokenizer gets."""
        return {TOKENIZER_FILE: self.model_bytes}

    @property
    def model_type(self) -> str:
        """ "bpe", "unigram", "char" or "word", as the model file records it."""
        from sentencepiece import sentencepiece_model_pb2 as pb  # protobuf: only when asked

        proto = pb.ModelProto()
        proto.ParseFromString(self.model_bytes)
        return pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        from .chat import render_chat  # refuses: no template

        return render_chat(self, messages, add_generation_prompt)

    def user_defined_tokens(self) -> dict[str, int]:
        """User-defined pieces (always matched whole, like "\\n" and `special_tokens`) -> id."""
        from sentencepiece import sentencepiece_model_pb2 as pb  # protobuf: only when asked

        proto = pb.ModelProto()
        proto.ParseFromString(self.model_bytes)
        user = pb.ModelProto.SentencePiece.USER_DEFINED
        return {p.piece: i for i, p in enumerate(proto.pieces) if p.type == user}

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    # --- encode / decode -------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, line by line (see the module docstring), with optional bos/eos."""
        ids = [self.bos_id] if bos and self.bos_id >= 0 else []
        for line_ids in self.encode_lines(text):
            ids.extend(line_ids)
        if eos and self.eos_id >= 0:
            ids.append(self.eos_id)
        return ids

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a generation prompt. `prepare` separates documents with EOS and never inserts
        BOS, so an empty prompt starts from EOS: the start of a new document, as in training."""
        ids = self.encode(text)
        if not ids and self.eos_id < 0:
            raise UserError("the prompt is empty and the tokenizer has no EOS to start from")
        return ids or [self.eos_id]

    def encode_lines(self, text: str) -> list[list[int]]:
        """Token ids per line of `text`; concatenated, they are `encode(text)`.

        Raises:
            UserError: `text` holds bytes that were not UTF-8 (lone surrogates, see the module
                docstring) and the model has no byte fallback, or a surrogate that is no byte.
        """
        lines = _lines(text)
        try:
            if self._space_byte_ids is None or _SPACE not in text:
                return self._sp.encode(lines)
            return [self._encode_literal_spaces(line) for line in lines]
        except (TypeError, RuntimeError):  # sentencepiece on a lone surrogate; free otherwise
            if _SURROGATES.search(text) is None:
                raise
        self._check_escaped_bytes(text)
        return [self._encode_escaped_bytes(line) for line in lines]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; control ids (bos/eos/pad) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer over this vocabulary."""
        return StreamingDetokenizer(self)

    def _check_escaped_bytes(self, text: str) -> None:
        """Refuse the first lone surrogate that cannot be encoded, naming where it is."""
        for run in _SURROGATES.finditer(text):
            for k, char in enumerate(run.group()):
                if ord(char) in _ESCAPED_BYTES and self._byte_ids is not None:
                    continue
                at = run.start() + k  # everything before is text or escaped bytes
                if ord(char) not in _ESCAPED_BYTES:
                    raise UserError(
                        f"the text holds a lone surrogate U+{ord(char):04X} at character {at}, "
                        "which is not a character; fix the text"
                    )
                offset = len(text[:at].encode("utf-8", "surrogateescape"))
                raise UserError(
                    f"the text is not valid UTF-8: byte 0x{ord(char) - 0xDC00:02X} at byte offset "
                    f"{offset}, and this tokenizer has no byte fallback to encode it; convert the "
                    "text to UTF-8"
                )

    def _encode_escaped_bytes(self, line: str) -> list[int]:
        """A line holding escaped bytes: the text around them as usual, each byte as its piece."""
        ids: list[int] = []
        start = 0
        for run in _SURROGATES.finditer(line):
            ids.extend(self._encode_text(line[start : run.start()]))
            ids.extend(self._byte_ids[ord(char) - 0xDC00] for char in run.group())
            start = run.end()
        ids.extend(self._encode_text(line[start:]))
        return ids

    def _encode_text(self, text: str) -> list[int]:
        if not text:
            return []
        if self._space_byte_ids is None or _SPACE not in text:
            return self._sp.encode(text)
        return self._encode_literal_spaces(text)

    def _encode_literal_spaces(self, line: str) -> list[int]:
        # A literal "▁" would decode as " ": emit its three byte pieces instead.
        ids: list[int] = []
        for k, part in enumerate(line.split(_SPACE)):
            if k:
                ids.extend(self._space_byte_ids)
            if part:
                ids.extend(self._sp.encode(part))
        return ids

    def _decode_tables(self) -> _DecodeTables:
        if self._tables is None:
            self._tables = _DecodeTables(self)
        return self._tables


def _lines(text: str) -> list[str]:
    """`text` cut after each "\\n" (str.splitlines would also cut at \\r, \\x0b, \\u2028 ...)."""
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


class _DecodeTables:
    """Per id, what it decodes to alone: built once per tokenizer (O(vocab)), shared."""

    def __init__(self, tokenizer: Tokenizer):
        from sentencepiece import sentencepiece_model_pb2 as pb  # protobuf, only when streaming

        sp = tokenizer._sp
        n = sp.vocab_size()
        unk_surface = sp.decode([sp.unk_id()]) if sp.unk_id() >= 0 else ""
        pieces = [sp.id_to_piece(i) for i in range(n)]
        self.surface = [
            "" if sp.is_control(i) or sp.is_byte(i) else p.replace(_SPACE, " ")
            for i, p in enumerate(pieces)
        ]
        self.kind = [
            _CONTROL
            if sp.is_control(i)
            else _BYTE
            if sp.is_byte(i)
            else _UNK
            if sp.is_unknown(i)
            else _NORMAL
            for i in range(n)
        ]
        for i in range(n):
            if self.kind[i] == _UNK:
                self.surface[i] = unk_surface
        self.byte = [
            int(_BYTE_PIECE.fullmatch(p).group(1), 16) if sp.is_byte(i) else -1
            for i, p in enumerate(pieces)
        ]
        proto = pb.ModelProto()
        proto.ParseFromString(tokenizer.model_bytes)
        spec = proto.normalizer_spec
        # sentencepiece drops the "▁" that starts the text when these are set.
        self.strip_leading_space = spec.add_dummy_prefix or spec.remove_extra_whitespaces
        self.strip_all_leading_spaces = spec.remove_extra_whitespaces


_NORMAL, _CONTROL, _UNK, _BYTE = range(4)


class Detokenizer:
    """What every streaming detokenizer shares: the ids added so far (`tokens`), the text they
    make (`text`) and the text not yet read (`last_segment`). Subclasses add `add_token` and
    `finalize` and pass each completed piece of text to `_emit`."""

    def reset(self) -> None:
        """Forget everything; start a new sequence."""
        self.tokens: list[int] = []
        self._parts: list[str] = []  # all text so far
        self._unread: list[str] = []  # text not yet returned by last_segment

    @property
    def last_segment(self) -> str:
        """The text completed since the last read of `last_segment`."""
        segment = "".join(self._unread)
        self._unread.clear()
        return segment

    @property
    def text(self) -> str:
        """All the text so far (bytes still held are not included until complete)."""
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]  # keep repeated reads cheap
        return self._parts[0] if self._parts else ""

    def _emit(self, text: str) -> None:
        if text:
            self._parts.append(text)
            self._unread.append(text)


class StreamingDetokenizer(Detokenizer):
    """Turns ids into text one at a time, as generation produces them (mlx-lm style).

    After any sequence of `add_token` calls and `finalize()`, `text == tokenizer.decode(tokens)`.
    Byte-fallback pieces are held until they form whole characters, so no segment ever ends in
    half a UTF-8 character. Each `add_token` is a table look-up, not a re-decode.

    Usage:
        detok = tokenizer.detokenizer()
        for token in generated:
            detok.add_token(token)
            print(detok.last_segment, end="", flush=True)
        detok.finalize()
        print(detok.last_segment)
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._tables = tokenizer._decode_tables()
        self.reset()

    def reset(self) -> None:
        """Forget everything; start a new sequence."""
        super().reset()
        self._pending_ids: list[int] = []  # byte pieces not yet forming whole characters
        self._pending_bytes = bytearray()
        self._at_start = True  # sentencepiece's "is_bos_ws"

    def add_token(self, token: int) -> None:
        """Add one id; its text, once complete, shows in `last_segment` and `text`."""
        token = int(token)
        tables = self._tables
        if not 0 <= token < len(tables.kind):
            raise ValueError(
                f"token id {token} is outside the vocabulary 0..{len(tables.kind) - 1}"
            )
        self.tokens.append(token)
        kind = tables.kind[token]
        if kind == _BYTE:
            self._pending_ids.append(token)
            self._pending_bytes.append(tables.byte[token])
            try:
                text = self._pending_bytes.decode("utf-8")
            except UnicodeDecodeError:
                return  # incomplete (or invalid): wait for more bytes or the end of the run
            self._pending_ids.clear()
            self._pending_bytes.clear()
            self._emit(text)
            return
        self._flush_bytes()
        text = tables.surface[token]
        if kind == _NORMAL and self._at_start and tables.strip_leading_space:
            if text.startswith(" "):
                text = text[1:]
                if not tables.strip_all_leading_spaces:
                    self._at_start = False
        self._emit(text)

    def finalize(self) -> None:
        """End the sequence: flush bytes still held (invalid UTF-8 decodes to U+FFFD)."""
        self._flush_bytes()

    def _emit(self, text: str) -> None:
        if text:
            super()._emit(text)
            self._at_start = False

    def _flush_bytes(self) -> None:
        if self._pending_ids:
            # sentencepiece's own rule for invalid bytes (one U+FFFD per bad byte).
            self._emit(self._tokenizer._sp.decode(self._pending_ids))
            self._pending_ids.clear()
            self._pending_bytes.clear()
