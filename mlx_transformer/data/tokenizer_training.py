"""Training a sentencepiece tokenizer whose round trips are exact (see `mlx_transformer.tokenizer`
for the choices and why); `prepare` calls it. No MLX.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from .. import atomic
from ..errors import UserError
from ..tokenizer import MODEL_TYPES, NEWLINE_PIECE, SPECIAL_IDS, Tokenizer

# sentencepiece skips training sentences longer than max_sentence_length (4192 bytes by default);
# we cut long lines into pieces of at most this many characters (<= 4 bytes each) instead.
_MAX_TRAIN_CHARS = 1000


def train_tokenizer(
    texts: Iterable[str],
    output: str | Path | None = None,
    *,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    special_tokens: Sequence[str] = (),
    input_sentence_size: int = 2_000_000,
    shuffle_input_sentence: bool = True,
    character_coverage: float = 0.9995,
    split_digits: bool = True,
    seed: int = 0,
    num_threads: int | None = None,
) -> Tokenizer:
    """Train a sentencepiece tokenizer that round-trips any text exactly.

    Args:
        texts: Strings (documents or lines), streamed; each is cut into lines for training.
            Exceptions raised while iterating (e.g. a `UserError` for bad input) propagate.
        output: Where to write the `.model` file (atomically); None keeps it in memory only.
        vocab_size: Pieces in the vocabulary, including 256 byte pieces and the special ids.
            The "char" model ignores it (its vocabulary is the corpus' characters plus bytes).
        model_type: "bpe" (default), "unigram" or "char".
        special_tokens: Extra user-defined tokens (e.g. "<|user|>"), always matched whole;
            they get ids 5, 6, ... in order (4 is "\\n").
        input_sentence_size: Train on at most this many lines, sampled uniformly when
            `shuffle_input_sentence` (reservoir sampling, so memory stays bounded).
        character_coverage: Share of characters covered by pieces; the rare rest use bytes.
        split_digits: Give each digit its own piece.
        seed: Seed for the line sampling.
        num_threads: Training threads (default: all CPUs).

    Returns:
        The trained `Tokenizer`.
    """
    if model_type not in MODEL_TYPES:
        raise UserError(f"unknown tokenizer model type {model_type!r}; use one of {MODEL_TYPES}")
    special_tokens = _check_special_tokens(special_tokens)
    failure: list[BaseException] = []  # sentencepiece wraps iterator errors; keep the original

    def sentences() -> Iterator[str]:
        try:
            for text in texts:
                for line in text.split("\n"):
                    for start in range(0, len(line), _MAX_TRAIN_CHARS):
                        yield line[start : start + _MAX_TRAIN_CHARS]
        except (Exception, KeyboardInterrupt) as e:  # not GeneratorExit: an early stop is fine
            failure.append(e)
            raise

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=True,
            unk_id=SPECIAL_IDS["unk"],
            bos_id=SPECIAL_IDS["bos"],
            eos_id=SPECIAL_IDS["eos"],
            pad_id=SPECIAL_IDS["pad"],
            user_defined_symbols=[NEWLINE_PIECE, *special_tokens],
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=split_digits,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=shuffle_input_sentence,
            hard_vocab_limit=model_type != "char",
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        if failure:
            raise failure[0] from None
        raise _training_error(str(e), vocab_size) from None
    if failure:
        raise failure[0]
    tokenizer = Tokenizer(model.getvalue())
    if output is not None:
        atomic.write_bytes(output, tokenizer.model_bytes)
        tokenizer.path = Path(output)
    return tokenizer


def _check_special_tokens(tokens: Sequence[str]) -> list[str]:
    reserved = {"<unk>", "<s>", "</s>", "<pad>", NEWLINE_PIECE}
    seen: set[str] = set()
    for token in tokens:
        if not token or token in reserved or token in seen or "," in token:
            raise UserError(
                f"special token {token!r} is empty, reserved, repeated or contains a comma; "
                "pass distinct tokens such as <|user|>"
            )
        seen.add(token)
    return list(tokens)


def _training_error(message: str, vocab_size: int) -> UserError:
    """Rephrase sentencepiece's trainer errors (C++ source lines and all) as one user line."""
    if m := re.search(r"Vocabulary size too high \((\d+)\).*?<= (\d+)", message):
        return UserError(
            f"vocabulary size {m.group(1)} is too large for this corpus: it supports at most "
            f"{m.group(2)}; pass --vocab-size {m.group(2)} or less, or add more text"
        )
    if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message):
        return UserError(
            f"vocabulary size {m.group(1)} is too small: this corpus needs at least {m.group(2)} "
            "(256 byte pieces, the special tokens and its common characters); "
            f"pass --vocab-size {m.group(2)} or more"
        )
    if "sentences_.empty()" in message or "no sentences" in message.lower():
        return UserError("the corpus holds no text to train a tokenizer on; check --data")
    detail = re.sub(r"^.*?\) \[.*?\] ", "", message.strip().splitlines()[0])
    return UserError(
        f"sentencepiece could not train the tokenizer (vocab size {vocab_size}): {detail}"
    )
