"""Hugging Face tokenizer files from our sentencepiece model, giving the same ids as
`Tokenizer.encode` in `tokenizers`, transformers (`AutoTokenizer`) and transformers.js.

Standard library plus sentencepiece's protobuf only: no MLX, no `tokenizers` needed to write.

    files = hf_tokenizer_files(tokenizer, model_max_length=1024)  # {file name: JSON object}
    write_hf_tokenizer_files(tokenizer, out_dir)                  # writes them; returns the names

A checkpoint imported with a Hugging Face tokenizer.json needs none of this: its files travel as
they are (`import_tokenizer` for convert --from-hf, `hf_folder_tokenizer` for --to-hf,
`export_tokenizer_files` for the export folder, each handling both kinds).

`tokenizer.json` is a BPE model with byte fallback, laid out as Llama 2's (the layout every
client reads, onnxruntime-genai's tokenizer included), made exact by these choices:

- The vocabulary keeps sentencepiece's "▁" for a space; a normalizer replaces " " by "▁" (and
  nothing else: no leading space is added) and the decoder turns "▁" back into " ". The one
  difference from `Tokenizer.encode`: a literal "▁" in the text, which ours encodes as its three
  bytes, is read as a space piece here. Merges are written as pairs (tokenizers >= 0.20).
- Merges are every split of a piece into two pieces, ranked by the piece's score: sentencepiece
  merges the adjacent pair whose result scores highest, so the order of merges is the same.
- "\\n" and the user-defined tokens are added tokens matched whole, so the text is cut at each
  newline as `Tokenizer.encode` cuts it into lines.
- unk/bos/eos/pad are special added tokens, but `split_special_tokens` in tokenizer_config.json
  makes transformers encode a literal "<s>" in the text as text, as sentencepiece does; nothing
  adds bos or eos (our prompts carry none). Clients that ignore that setting (the `tokenizers`
  library unless `encode_special_tokens = True`, tokenizers.js and transformers.js) read a
  literal "<s>", "</s>", "<unk>" or "<pad>" in the text as that token: the one difference.

Measured on a probe set (newlines, spaces, unicode, emoji, byte fallback) and the
embedded corpus: the same ids in transformers 4.57 and 5.x, tokenizers, tokenizers.js and
transformers.js, for BPE and char models; decoding valid text round-trips. Invalid UTF-8 byte
runs decode to U+FFFD in both, but not always as many of them.

BPE and char models convert (char: BPE without merges). Unigram models are refused: their
byte pieces would become matchable text. So are models whose normalization differs from what
`mlx-transformer prepare` trains (identity rule, no dummy prefix, no whitespace removal, byte
fallback), which these files could not reproduce exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import atomic
from ..errors import UserError
from ..hf_tokenizers import TOKENIZER_JSON as TOKENIZER_JSON
from ..tokenizer import TOKENIZER_FILE, Tokenizer
from ..tokenizer_files import copy_tokenizer, find_tokenizer, load_tokenizer

TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
# The files `write_hf_tokenizer_files` writes, in order.
HF_TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, GENERATION_CONFIG)

_SPACE = "\u2581"
_NAMES = {"unk": "unk_token", "bos": "bos_token", "eos": "eos_token", "pad": "pad_token"}


def hf_tokenizer_files(
    tokenizer: Tokenizer | str | Path | bytes, model_max_length: int | None = None
) -> dict[str, dict]:
    """The four Hugging Face files as {file name: JSON object}, for callers that write them
    their own way (e.g. into a web page). `tokenizer`: a `Tokenizer`, a path to a
    `tokenizer.model` (or a folder holding one), or its bytes. `model_max_length`: the longest
    sequence the model takes (its max_position_embeddings), recorded in tokenizer_config.json.

    Raises:
        UserError: the model cannot be written exactly (see the module docstring).
    """
    tok = _as_tokenizer(tokenizer)
    proto = _proto(tok)
    _check_exact(tok, proto)
    special = {name: i for name, i in tok.special_ids.items() if i >= 0}
    pieces = [p.piece for p in proto.pieces]
    types = proto.SentencePiece
    added, vocab, mergeable = [], {}, {}
    for i, p in enumerate(proto.pieces):
        if p.type == types.CONTROL or p.type == types.UNKNOWN:
            token = p.piece
            added.append(_added(i, token, special=True))
        elif p.type == types.BYTE:
            token = p.piece
        else:
            token = p.piece
            if p.type == types.USER_DEFINED:
                added.append(_added(i, token, special=False))
            else:
                mergeable[token] = (p.score, i)
        vocab[token] = i
    files = {
        TOKENIZER_JSON: {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE},
            "pre_tokenizer": None,
            "post_processor": None,
            "decoder": {
                "type": "Sequence",
                "decoders": [
                    {"type": "Replace", "pattern": {"String": _SPACE}, "content": " "},
                    {"type": "ByteFallback"},
                    {"type": "Fuse"},
                ],
            },
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": pieces[tok.unk_id],
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": True,
                "ignore_merges": False,
                "vocab": vocab,
                "merges": _merges(mergeable),
            },
        },
    }
    special_map = {_NAMES[name]: pieces[i] for name, i in special.items()}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
    }
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    files[TOKENIZER_CONFIG] = config
    files[SPECIAL_TOKENS_MAP] = special_map
    files[GENERATION_CONFIG] = {
        f"{name}_token_id": special[name] for name in ("bos", "eos", "pad") if name in special
    }
    return files


def write_hf_tokenizer_files(
    tokenizer: Tokenizer | str | Path | bytes,
    out_dir: str | Path,
    model_max_length: int | None = None,
) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and
    generation_config.json into the existing folder `out_dir` (each file atomically; nothing is
    written if the model cannot be converted). Returns the file names written."""
    files = hf_tokenizer_files(tokenizer, model_max_length)
    for name, content in files.items():
        atomic.write_text(Path(out_dir) / name, json.dumps(content, indent=2, ensure_ascii=False))
    return list(files)


def hf_folder_tokenizer(path: str | Path, config) -> tuple:
    """The checkpoint's tokenizer at `path`, checked to fit `config` (a ModelConfig), and a
    function that writes it into a Hugging Face folder: a sentencepiece model with the four
    files above made from it, or an imported tokenizer.json as it is, with its config files and
    generation_config.json.

    Raises:
        UserError: the tokenizer cannot be loaded, does not fit, or cannot be written exactly.
    """
    tok = load_tokenizer(path)
    tok.check_fits(config.vocab_size)
    if isinstance(tok, Tokenizer):
        files = hf_tokenizer_files(tok, config.max_position_embeddings)

        def write(folder: Path) -> None:
            (folder / TOKENIZER_FILE).write_bytes(tok.model_bytes)
            for name, content in files.items():
                text = json.dumps(content, indent=2, ensure_ascii=False) + "\n"
                (folder / name).write_text(text, encoding="utf-8")

        return tok, write

    def write(folder: Path) -> None:
        copy_tokenizer(path, folder)
        _write_generation_config(tok, folder)

    return tok, write


def _write_generation_config(tok, folder: Path) -> None:
    """generation_config.json with the tokenizer's special ids over the model's own file (its
    other settings kept); eos_token_id lists every id generation stops at, where several."""
    config = json.loads(tok.files.get(GENERATION_CONFIG, b"{}"))
    for name, i in tok.special_ids.items():
        if name != "unk":
            config.pop(f"{name}_token_id", None)
            if i >= 0:
                config[f"{name}_token_id"] = i
    if len(tok.eos_ids) > 1:
        config["eos_token_id"] = list(tok.eos_ids)
    atomic.write_text(Path(folder) / GENERATION_CONFIG, json.dumps(config, indent=2) + "\n")


def export_tokenizer_files(ckpt: str | Path, out: str | Path, model_max_length: int) -> str:
    """Put the checkpoint's tokenizer into the export folder `out` (atomically per file) for
    our runtime and the Hugging Face clients. A sentencepiece model is copied and the four files
    above are made from it; an imported tokenizer.json is copied as it is, with its config files,
    and generation_config.json gets its special ids. Returns what io.json says about
    tokenizer.json (a model the files cannot reproduce id for id gets none, and the reason)."""
    source = find_tokenizer(ckpt)
    if source is None:
        return "not written: the checkpoint has no tokenizer"
    tok = load_tokenizer(source)
    if isinstance(tok, Tokenizer):
        copy_tokenizer(source, out)
        try:
            write_hf_tokenizer_files(tok, out, model_max_length)
        except UserError as e:
            return f"not written: {e}"
        return "written (ids equal tokenizer.model's)"
    copy_tokenizer(source, out)
    _write_generation_config(tok, out)
    return "copied (the model's own tokenizer.json)"


def import_tokenizer(hf_dir: str | Path, vocab_size: int) -> Path | None:
    """The tokenizer `convert --from-hf` takes from a Hugging Face folder (`find_tokenizer`'s
    choice) or the file given with --tokenizer, checked to load and to fit the model's
    `vocab_size` embedding rows; None when the folder has none."""
    hf_dir = Path(hf_dir)
    chosen = hf_dir if hf_dir.is_file() else find_tokenizer(hf_dir)
    if chosen is not None:
        load_tokenizer(chosen).check_fits(vocab_size)
    return chosen


def _as_tokenizer(tokenizer: Tokenizer | str | Path | bytes) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, (bytes, bytearray)):
        return Tokenizer(bytes(tokenizer))
    return Tokenizer.load(tokenizer)


def _proto(tok: Tokenizer):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tok.model_bytes)
    return proto


def _check_exact(tok: Tokenizer, proto) -> None:
    """Refuse, in one line, what the files could not reproduce id for id."""
    where = tok.path if tok.path is not None else "the tokenizer"
    model_type = proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type).lower()
    norm = proto.normalizer_spec
    problems = []
    if model_type not in ("bpe", "char"):
        problems.append(f"it is a {model_type} model (only bpe and char convert exactly)")
    if norm.precompiled_charsmap or norm.name not in ("identity", ""):
        problems.append(f"it normalizes text ({norm.name!r})")
    if norm.add_dummy_prefix:
        problems.append("it adds a dummy prefix space")
    if norm.remove_extra_whitespaces:
        problems.append("it removes extra whitespace")
    if not norm.escape_whitespaces:
        problems.append("it does not escape whitespace")
    if proto.trainer_spec.treat_whitespace_as_suffix:
        problems.append("it treats whitespace as a suffix")
    if not proto.trainer_spec.byte_fallback:
        problems.append("it has no byte fallback")
    if tok.unk_id < 0:
        problems.append("it has no <unk> piece")
    if any(p.type == proto.SentencePiece.UNUSED for p in proto.pieces):
        problems.append("it has unused pieces")
    if problems:
        raise UserError(
            f"{where} cannot be written as a Hugging Face tokenizer.json that gives the same ids: "
            f"{'; '.join(problems)}; use a tokenizer trained by `mlx-transformer prepare` "
            "(--model-type bpe or char)"
        )


def _added(token_id: int, content: str, *, special: bool) -> dict:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def _merges(mergeable: dict[str, tuple[float, int]]) -> list[list[str]]:
    """Every split of a normal piece into two normal pieces (the only ones sentencepiece merges),
    best-scoring result first (ties: by id, then by the left part's length)."""
    ranked = []
    for piece, (score, piece_id) in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-score, piece_id, cut, left, right))
    ranked.sort()
    return [[left, right] for *_, left, right in ranked]


__all__ = [
    "hf_tokenizer_files",
    "write_hf_tokenizer_files",
    "export_tokenizer_files",
    "hf_folder_tokenizer",
    "import_tokenizer",
    "HF_TOKENIZER_FILES",
    "TOKENIZER_JSON",
    "TOKENIZER_CONFIG",
    "SPECIAL_TOKENS_MAP",
    "GENERATION_CONFIG",
]
