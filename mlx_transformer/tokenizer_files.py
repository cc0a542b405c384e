"""Which tokenizer a folder holds, and the one way to load, copy and import it.

A checkpoint, dataset or export folder holds one of two tokenizers:

  tokenizer.model   a sentencepiece model (`tokenizer.Tokenizer`): trained by `prepare`, or
                    imported from a model that has nothing else
  tokenizer.json    a Hugging Face tokenizer (`hf_tokenizers.HFTokenizer`), with
                    tokenizer_config.json, special_tokens_map.json, chat_template.jinja beside it

`load_tokenizer(path)` picks the implementation from the files present (tokenizer.model first: a
folder written here for a sentencepiece model also holds a tokenizer.json made from it, for other
runtimes). Everything that reads a tokenizer goes through it; `copy_tokenizer` carries one from
folder to folder, all its files together.

Imports no MLX.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import UserError
from .hf_tokenizers import HF_TOKENIZER_FILES, TOKENIZER_JSON, HFTokenizer
from .tokenizer import TOKENIZER_FILE, Tokenizer

# Every file name a tokenizer may be made of (what folder policies must allow).
TOKENIZER_FILES = (TOKENIZER_FILE, *HF_TOKENIZER_FILES)


def find_tokenizer(folder: str | Path) -> Path | None:
    """The tokenizer's main file in `folder`, or None: tokenizer.model or tokenizer.json, the one
    that is there; where both are, tokenizer.model if `prepare` could have trained it (then the
    tokenizer.json beside it was written from it, by export or convert --to-hf), else
    tokenizer.json, which is how transformers reads a pretrained model (Llama 2's sentencepiece
    model adds a dummy prefix, which our line-by-line encoding would not reproduce)."""
    model, hf_json = Path(folder) / TOKENIZER_FILE, Path(folder) / TOKENIZER_JSON
    if model.is_file() and hf_json.is_file():
        return model if _trained_here(model) else hf_json
    for path in (model, hf_json):
        if path.is_file():
            return path
    return None


def _trained_here(path: Path) -> bool:
    """Whether a sentencepiece model keeps text as it is, as `prepare` trains them."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception:  # not a model at all: loading it says so
        return True
    norm = proto.normalizer_spec
    return (
        norm.name in ("identity", "")
        and not norm.precompiled_charsmap
        and not norm.add_dummy_prefix
        and not norm.remove_extra_whitespaces
        and proto.trainer_spec.byte_fallback
    )


def load_tokenizer(path: str | Path) -> Tokenizer | HFTokenizer:
    """The tokenizer at `path`: a folder holding one, a tokenizer.model or a tokenizer.json."""
    path = Path(path)
    if path.is_dir():
        found = find_tokenizer(path)
        if found is None:
            raise UserError(
                f"{path} holds no tokenizer (no {TOKENIZER_FILE} nor {TOKENIZER_JSON}); pass a "
                "checkpoint or dataset folder that has one"
            )
        path = found
    if path.name == TOKENIZER_JSON or path.suffix == ".json":
        return HFTokenizer.load(path)
    return Tokenizer.load(path)


def tokenizer_from_files(files: dict[str, bytes]) -> Tokenizer | HFTokenizer:
    """Rebuild a tokenizer from its `files` ({name: bytes}), e.g. in a worker process."""
    if TOKENIZER_FILE in files:
        return Tokenizer(files[TOKENIZER_FILE])
    return HFTokenizer(files)


def tokenizer_files(tokenizer: Tokenizer | HFTokenizer) -> dict[str, bytes]:
    """{file name: content} of a loaded tokenizer: what a folder holding it gets."""
    if isinstance(tokenizer, HFTokenizer):
        return dict(tokenizer.files)
    return {TOKENIZER_FILE: tokenizer.model_bytes}


def copy_tokenizer(source: str | Path, folder: str | Path) -> list[str]:
    """Copy the tokenizer at `source` (its main file, or a folder holding one) into `folder`
    with all its files, under their standard names. Returns the names copied."""
    source = Path(source)
    main = find_tokenizer(source) if source.is_dir() else source
    if main is None:
        raise UserError(f"{source} holds no tokenizer ({TOKENIZER_FILE} or {TOKENIZER_JSON})")
    if main.name == TOKENIZER_JSON or main.suffix == ".json":
        pairs = [(main, TOKENIZER_JSON)]
        pairs += [(main.with_name(n), n) for n in HF_TOKENIZER_FILES if n != TOKENIZER_JSON]
    else:
        pairs = [(main, TOKENIZER_FILE)]
    copied = []
    for file, name in pairs:
        if file.is_file():
            shutil.copyfile(file, Path(folder) / name)
            copied.append(name)
    return copied
