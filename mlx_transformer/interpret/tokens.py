"""A prompt as the model reads it (after EOS), and its tokens as readable labels."""

from __future__ import annotations


def document_ids(tokenizer, text: str) -> list[int]:
    """Ids of `text` read as the start of a document: EOS first (where the tokenizer has one)."""
    return ([tokenizer.eos_id] if tokenizer.eos_id >= 0 else []) + tokenizer.encode(text)


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """Readable labels: ▁ shown as a leading space mark, byte pieces decoded where printable."""
    labels = []
    for i in ids:
        piece = tokenizer.id_to_piece(i)
        if piece.startswith("<0x") and piece.endswith(">"):
            char = chr(int(piece[3:-1], 16))
            piece = repr(char)[1:-1] if char.isprintable() or char in "\n\t" else piece
        labels.append(piece.replace("\u2581", "\u2423") or "∅")
    return labels
