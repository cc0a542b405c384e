"""Shared fixtures. Tests build tiny models and tokenizers from text in the repo; no network."""

import os
import sys
from pathlib import Path

from mlx_transformer.cpu.blas import REEXEC_MARKER, SETTING_VAR, blas_summary

# MLX's CPU matmuls run on an optimized BLAS when scripts/test.sh preloaded one (pytest cannot
# re-execute itself the way the command line does). Without it (a plain `pytest`), the session
# keeps MLX's own BLAS: the header says so once, and the commands under test stay quiet about it.
if not os.environ.get(REEXEC_MARKER):
    os.environ.setdefault(SETTING_VAR, "reference")


def pytest_report_header(config):
    if os.environ.get(REEXEC_MARKER):
        return blas_summary()
    return f"{blas_summary()}; scripts/test.sh preloads an optimized one (much faster on Linux)"


# tests/reference.py (the float64 numpy model) is imported by several test files.
sys.path.insert(0, str(Path(__file__).parent))

# Nothing is downloaded at test time: transformers must never reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --- Tokenizer and data fixtures ----------------------------------------------------------
# Tiny sentencepiece models, trained once per session from the embedded corpus' first 50 KB.

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_corpus_text() -> str:
    """The first ~50 KB of the embedded Tiny Shakespeare (cut at a line end)."""
    from mlx_transformer.data.dataset import default_corpus_path

    text = default_corpus_path().read_text(encoding="utf-8")[:50_000]
    return text[: text.rfind("\n") + 1]


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory, tiny_corpus_text) -> Path:
    """A BPE sentencepiece model (vocab 400: 256 bytes, 5 specials, ~140 merges)."""
    from mlx_transformer.data.tokenizer_training import train_tokenizer

    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    train_tokenizer([tiny_corpus_text], path, vocab_size=400, num_threads=1)
    return path


@pytest.fixture(scope="session")
def tiny_char_tokenizer_path(tmp_path_factory, tiny_corpus_text) -> Path:
    """A character-level sentencepiece model (the corpus' characters plus 256 bytes)."""
    from mlx_transformer.data.tokenizer_training import train_tokenizer

    path = tmp_path_factory.mktemp("char_tokenizer") / "tokenizer.model"
    train_tokenizer([tiny_corpus_text], path, model_type="char", num_threads=1)
    return path


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_path):
    """The tiny BPE model, loaded."""
    from mlx_transformer.tokenizer import Tokenizer

    return Tokenizer.load(tiny_tokenizer_path)


@pytest.fixture
def corpus_file(tmp_path, tiny_corpus_text) -> Path:
    """tiny_corpus_text as a file."""
    path = tmp_path / "corpus.txt"
    path.write_text(tiny_corpus_text, encoding="utf-8")
    return path
