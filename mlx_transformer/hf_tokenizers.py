"""A Hugging Face tokenizer (tokenizer.json) behind the same interface as `tokenizer.Tokenizer`.

The `tokenizers` library does the work (BPE is not re-implemented here); this module reads the
files a pretrained model comes with and gives the ids training and generation need:

  tokenizer.json           the model: BPE, byte-level (GPT-2, Llama 3, Qwen) or with byte
                           fallback (Llama 2, SmolLM's sentencepiece-converted ones)
  tokenizer_config.json    special tokens (bos/eos/pad/unk), add_bos_token, chat_template
  special_tokens_map.json  special tokens, for older folders
  chat_template.jinja      the chat template, where newer folders keep it
  generation_config.json   eos_token_id: the ids generation stops at (one, or a list: Llama 3
                           Instruct ends a turn with <|eot_id|>, a text with <|end_of_text|>)

Text is encoded as transformers encodes it (`tokenizer(text, add_special_tokens=False)`):
special tokens written in the text ("<|im_start|>") are read as those tokens, which is what chat
templates rely on. Decoding drops special tokens. Other models (WordPiece, Unigram, WordLevel)
are refused: they are not used by causal language models and cannot encode every text.

Imports no MLX: `export/` and the no-MLX runtime use it as is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from .errors import UserError
from .tokenizer import Detokenizer

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
# Every file of a Hugging Face tokenizer this module reads, the model first.
HF_TOKENIZER_FILES = (
    TOKENIZER_JSON,
    TOKENIZER_CONFIG,
    SPECIAL_TOKENS_MAP,
    CHAT_TEMPLATE_FILE,
    GENERATION_CONFIG,
)

_SPECIAL_NAMES = ("unk", "bos", "eos", "pad")


class HFTokenizer:
    """A tokenizer.json (+ its config files) with the interface of `tokenizer.Tokenizer`."""

    def __init__(self, files: dict[str, bytes], path: Path | None = None):
        """`files`: {file name: content} of HF_TOKENIZER_FILES (tokenizer.json required);
        `path`: where tokenizer.json was read, for messages."""
        from tokenizers import Tokenizer as _Backend  # imported here: only HF folders need it

        self.files = {name: files[name] for name in HF_TOKENIZER_FILES if name in files}
        self.path = path
        where = path if path is not None else TOKENIZER_JSON
        try:
            spec = json.loads(files[TOKENIZER_JSON])
            self._tok = _Backend.from_str(files[TOKENIZER_JSON].decode("utf-8"))
        except Exception as e:  # the library's errors are plain Exceptions with its message
            raise UserError(
                f"{where} cannot be loaded by the tokenizers library ({_first_line(e)}); pass the "
                "tokenizer.json the model came with"
            ) from None
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise UserError(
                f"{where}: model.type {model.get('type')!r} is not supported; only BPE tokenizers "
                "(byte-level as GPT-2/Llama 3/Qwen, or with byte_fallback as Llama 2/SmolLM) are"
            )
        self.byte_level = _has_type(spec.get("pre_tokenizer"), "ByteLevel")
        self.byte_fallback = bool(model.get("byte_fallback"))
        self._byte_pieces: frozenset[int] | None = None
        self.model_type = "bpe"
        config = self._read_config(TOKENIZER_CONFIG, where)
        tokens_map = self._read_config(SPECIAL_TOKENS_MAP, where)
        self.special_tokens = {}  # {"bos_token": "<s>", ...} as the chat template sees them
        for name in _SPECIAL_NAMES:
            key = f"{name}_token"
            token = _content(config.get(key, tokens_map.get(key)))
            if name == "unk" and token is None:
                token = model.get("unk_token")
            if token is not None:
                self.special_tokens[key] = token
        self._ids = {}
        for name in _SPECIAL_NAMES:
            token = self.special_tokens.get(f"{name}_token")
            token_id = self._tok.token_to_id(token) if token is not None else None
            self._ids[name] = -1 if token_id is None else token_id
        generation = self._read_config(GENERATION_CONFIG, where)
        self._eos_ids = _eos_ids(self._ids["eos"], generation, _beside(where, GENERATION_CONFIG))
        self.add_bos = config.get("add_bos_token")  # None: as tokenizer.json's post-processor
        self.chat_template = _chat_template(self.files, config, where)
        # Where the template came from, for messages: "DIR/chat_template.jinja" or
        # "DIR/tokenizer_config.json field chat_template".
        self.chat_template_source = (
            str(_beside(where, CHAT_TEMPLATE_FILE))
            if CHAT_TEMPLATE_FILE in self.files
            else f"{_beside(where, TOKENIZER_CONFIG)} field chat_template"
        )
        self.config_file = TOKENIZER_CONFIG if TOKENIZER_CONFIG in self.files else None
        # Whether transformers starts an encoded text with BOS (add_bos_token, else the
        # post-processor's template): fine-tuning prompts are encoded so too.
        self.adds_bos = self.bos_id >= 0 and (
            bool(self.add_bos)
            if self.add_bos is not None
            else self._tok.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]
        )
        ids = list(self._tok.get_vocab(with_added_tokens=True).values())
        self._vocab_size = max(ids) + 1 if ids else 0
        digest = hashlib.sha256()
        for name, content in self.files.items():
            digest.update(f"{name}\0{len(content)}\0".encode())
            digest.update(content)
        self.checksum = digest.hexdigest()

    @classmethod
    def load(cls, path: str | Path) -> HFTokenizer:
        """Load a tokenizer.json (or a folder holding one) and the config files beside it."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_JSON
        files = {}
        for name in HF_TOKENIZER_FILES:
            file = path if name == TOKENIZER_JSON else path.with_name(name)
            try:
                files[name] = file.read_bytes()
            except FileNotFoundError:
                if name == TOKENIZER_JSON:
                    raise UserError(f"tokenizer file {path} not found") from None
            except OSError as e:
                raise UserError(f"cannot read tokenizer file {file}: {e.strerror}") from None
        return cls(files, path)

    def _read_config(self, name: str, where) -> dict:
        if name not in self.files:
            return {}
        try:
            config = json.loads(self.files[name])
        except (ValueError, RecursionError) as e:
            raise UserError(f"{_beside(where, name)}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            kind = type(config).__name__
            raise UserError(f"{_beside(where, name)}: a JSON {kind}, not an object")
        return config

    # --- ids -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (added tokens included): the embedding rows needed."""
        return self._vocab_size

    @property
    def unk_id(self) -> int:
        return self._ids["unk"]

    @property
    def bos_id(self) -> int:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos"]

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The ids generation stops at: EOS first, then generation_config.json's other
        eos_token_id (Llama 3 Instruct stops at <|eot_id|> and <|end_of_text|>)."""
        return self._eos_ids

    @property
    def pad_id(self) -> int:
        return self._ids["pad"]

    @property
    def special_ids(self) -> dict[str, int]:
        """{"unk": .., "bos": .., "eos": .., "pad": ..}; -1 where the tokenizer has none."""
        return dict(self._ids)

    def check_fits(self, vocab_size: int) -> None:
        """Refuse a model with fewer embedding rows than this tokenizer has ids (more rows are
        fine: Hugging Face models often pad the embedding table)."""
        if self.vocab_size > vocab_size:
            where = self.path if self.path is not None else TOKENIZER_JSON
            raise UserError(
                f"{where} has {self.vocab_size} ids but the model's vocab_size (embedding rows) "
                f"is {vocab_size}: they do not belong together; use the tokenizer the model "
                "came with"
            )

    def user_defined_tokens(self) -> dict[str, int]:
        """Added tokens (matched whole in text) -> id."""
        return {t.content: i for i, t in sorted(self._tok.get_added_tokens_decoder().items())}

    def byte_piece_ids(self) -> frozenset[int]:
        """The ids of the byte-fallback pieces <0x00>..<0xFF> (none without byte fallback)."""
        if self._byte_pieces is None:
            ids = (self._tok.token_to_id(f"<0x{b:02X}>") for b in range(256))
            found = (i for i in ids if i is not None)
            self._byte_pieces = frozenset(found) if self.byte_fallback else frozenset()
        return self._byte_pieces

    def special_token_ids(self) -> frozenset[int]:
        """The ids of the special added tokens (they decode to nothing)."""
        added = self._tok.get_added_tokens_decoder().items()
        return frozenset(i for i, token in added if token.special)

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id)) or ""

    def piece_to_id(self, piece: str) -> int:
        token_id = self._tok.token_to_id(piece)
        return self.unk_id if token_id is None else token_id

    # --- encode / decode -------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text` (special tokens in it are read as such), with optional bos/eos."""
        ids = [self.bos_id] if bos and self.bos_id >= 0 else []
        ids.extend(self._encode(text))
        if eos and self.eos_id >= 0:
            ids.append(self.eos_id)
        return ids

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a generation prompt, as transformers' `tokenizer(text)` gives them: with BOS
        where the tokenizer adds one. An empty prompt starts from BOS (or EOS)."""
        if self.add_bos is None:
            ids = self._encode(text, add_special_tokens=True)
        else:
            ids = self.encode(text, bos=bool(self.add_bos))
        if ids:
            return ids
        start = self.bos_id if self.bos_id >= 0 else self.eos_id
        if start < 0:
            raise UserError("the prompt is empty and the tokenizer has no BOS or EOS to start from")
        return [start]

    def encode_lines(self, text: str) -> list[list[int]]:
        """`encode(text)` as one list: a Hugging Face tokenizer's pre-tokenizer decides where
        tokens may end, so the text is not cut into lines first."""
        return [self._encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; special tokens decode to nothing."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def detokenizer(self) -> HFStreamingDetokenizer:
        return HFStreamingDetokenizer(self)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation rendered with this tokenizer's chat template (see `chat`)."""
        from .chat import render_chat

        return render_chat(self, messages, add_generation_prompt)

    def _encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        try:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        except Exception as e:  # the one the library raises for text that is not UTF-8
            at = next((i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF), None)
            if at is not None:
                raise UserError(
                    f"the text is not valid UTF-8 (a byte that is no character, at character "
                    f"{at}); convert the text to UTF-8"
                ) from None
            raise RuntimeError(f"tokenizers failed to encode the text: {e}") from e


class HFStreamingDetokenizer(Detokenizer):
    """Ids to text one at a time (the interface of `tokenizer.StreamingDetokenizer`).

    Each new token is decoded with the token before it as context (`decode` is not additive:
    a Metaspace decoder strips the first space, bytes combine across tokens), and the context's
    own text is cut off. Text ending in U+FFFD (a character whose bytes are not all there yet)
    is held until it is whole, so no segment ends in half a character. UTF-8 decoding never
    changes text before a complete character, so after `finalize()`
    `text == tokenizer.decode(tokens)`; should the context trick ever disagree, the text is
    taken from a full decode instead. (The library's `DecodeStream` raises on some invalid
    byte sequences, which a sampling model can produce.)
    """

    def __init__(self, tokenizer: HFTokenizer):
        self._tokenizer = tokenizer
        self._byte_ids = tokenizer.byte_piece_ids()
        self._special_ids = tokenizer.special_token_ids()
        self.reset()

    def reset(self) -> None:
        super().reset()
        self._start = 0  # the next window decodes tokens[_start:] ...
        self._context = ""  # ... and drops this, the text of tokens already shown

    def add_token(self, token: int) -> None:
        token = int(token)
        if token < 0:
            raise ValueError(f"token id {token} is negative")
        # An id past the vocabulary (a padded embedding row, which a model can still sample)
        # decodes to nothing, as in `decode`.
        self.tokens.append(token)
        self._advance(final=False)

    def finalize(self) -> None:
        """End the sequence: held bytes are decoded as `decode` decodes them."""
        self._advance(final=True)

    def _advance(self, final: bool) -> None:
        decode = self._tokenizer.decode
        window = decode(self.tokens[self._start :])
        if window.startswith(self._context):
            new = window[len(self._context) :]
        else:
            full = decode(self.tokens)
            text = self.text
            new = full[len(text) :] if full.startswith(text) else ""
        if not final and (new.endswith("\ufffd") or self._in_byte_run()):
            return  # an incomplete character: wait for the rest of its bytes
        self._emit(new)
        # The next window starts at the last token that is not special (specials decode to
        # nothing, and a decoder that strips the text's first space must see text before).
        last = next(
            (k for k in range(len(self.tokens) - 1, -1, -1)
             if self.tokens[k] not in self._special_ids),
            None,
        )  # fmt: skip
        if last is not None:
            self._start = last
            self._context = decode(self.tokens[last:])

    def _in_byte_run(self) -> bool:
        """Whether the last piece (special tokens decode to nothing, so they do not count) is a
        byte-fallback piece: a run of them is held whole, since the decoder replaces all of it
        when any of it is invalid UTF-8."""
        for token in reversed(self.tokens):
            if token not in self._special_ids:
                return token in self._byte_ids
        return False


def _has_type(component: dict | None, name: str) -> bool:
    """Whether a tokenizer.json component (or a Sequence of them) holds one of type `name`."""
    if not isinstance(component, dict):
        return False
    if component.get("type") == name:
        return True
    parts = component.get("pretokenizers") or component.get("decoders") or []
    return any(_has_type(part, name) for part in parts)


def _eos_ids(eos: int, generation: dict, where) -> tuple[int, ...]:
    """The tokenizer's eos, then generation_config.json's eos_token_id (an id or a list)."""
    listed = generation.get("eos_token_id")
    listed = [] if listed is None else listed if isinstance(listed, list) else [listed]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in listed):
        raise UserError(
            f"{where}: eos_token_id is {generation['eos_token_id']!r}, not a token id or a list "
            "of them; fix the file"
        )
    return tuple(dict.fromkeys(([eos] if eos >= 0 else []) + listed))


def _content(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _chat_template(files: dict[str, bytes], config: dict, where) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or a list of
    {"name", "template"} of which "default" is used)."""
    if CHAT_TEMPLATE_FILE in files:
        return files[CHAT_TEMPLATE_FILE].decode("utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise UserError(
            f"{_beside(where, TOKENIZER_CONFIG)}: chat_template is not a string; fix the file"
        )
    return template


def _beside(where, name: str) -> Path | str:
    return Path(where).with_name(name) if where is not None else name


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
