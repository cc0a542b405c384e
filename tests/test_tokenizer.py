"""Tokenizer: exact round trips, fixed special ids, training errors, streaming detokenizer."""

import hashlib
import io
import subprocess
import sys

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_transformer.data.tokenizer_training import train_tokenizer
from mlx_transformer.errors import UserError
from mlx_transformer.tokenizer import SPECIAL_IDS, Tokenizer

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text that stresses the tokenizer: whitespace runs, newlines, CR, tabs, the "▁" sentencepiece
# uses for spaces, byte-fallback characters (emoji, CJK, combining marks), and anything else.
tricky_text = st.text(
    st.one_of(
        st.sampled_from(list(" \n\t\r\u2581ae😀中文\u0301\x00")),
        st.characters(codec="utf-8"),
    ),
    max_size=60,
)


@pytest.fixture(scope="module")
def dummy_prefix_tok(tiny_corpus_text):
    """A model with sentencepiece's default options (dummy prefix, nmt_nfkc): its decoder drops
    the leading space, which the streaming detokenizer must mimic."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus_text.split("\n")),
        model_writer=model,
        vocab_size=400,
        byte_fallback=True,
        character_coverage=0.99,
        minloglevel=2,
        num_threads=1,
    )
    return Tokenizer(model.getvalue())


def test_special_ids_are_fixed(tok):
    assert tok.special_ids == SPECIAL_IDS == {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
    assert tok.user_defined_tokens() == {"\n": 4}
    assert tok.vocab_size == 400
    assert tok.encode("ab", bos=True, eos=True)[0] == 1
    assert tok.encode("ab", bos=True, eos=True)[-1] == 2
    assert tok.decode([1, *tok.encode("ab"), 2, 3]) == "ab"  # control ids decode to nothing


def test_checksum_is_sha256_of_file(tok, tiny_tokenizer_path):
    assert tok.checksum == hashlib.sha256(tiny_tokenizer_path.read_bytes()).hexdigest()
    assert Tokenizer.load(tiny_tokenizer_path.parent).checksum == tok.checksum  # folder works


@pytest.mark.parametrize(
    "text",
    [
        "",
        " leading space",
        "trailing space ",
        "two  spaces\tand a tab",
        "\n\nblank lines\n\n",
        "CRLF\r\nline",
        "digits 12345 and 3.14",
        "x\u2581y \u2581\u2581",  # a literal "▁" must not come back as a space
        "emoji 😀, CJK 中文, é (e + U+0301), ﬁ (no NFKC)",
        "\x00\x01 control characters",
    ],
)
def test_round_trip_examples(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_id not in ids


@FAST
@given(text=tricky_text)
def test_round_trip_any_unicode(tok, text):
    ids = tok.encode(text)
    assert tok.unk_id not in ids  # byte fallback: nothing is unknown
    assert tok.decode(ids) == text


@FAST
@given(a=tricky_text, b=tricky_text)
def test_newlines_are_hard_boundaries(tok, a, b):
    # Why prepare may encode a corpus in blocks cut at line ends: the result does not depend on
    # the cut.
    assert tok.encode(a + "\n" + b) == tok.encode(a + "\n") + tok.encode(b)


def test_round_trip_char_and_unigram(tiny_char_tokenizer_path, tiny_corpus_text):
    char = Tokenizer.load(tiny_char_tokenizer_path)
    unigram = train_tokenizer([tiny_corpus_text[:20_000]], vocab_size=350, model_type="unigram")
    text = "Hark, 😀 中文!\n  indented"
    for t in (char, unigram):
        assert t.special_ids == SPECIAL_IDS
        assert t.decode(t.encode(text)) == text
    assert len(char.encode("First")) == 5  # one piece per character


def test_special_tokens_are_atomic(tiny_corpus_text):
    t = train_tokenizer([tiny_corpus_text[:20_000]], vocab_size=350, special_tokens=["<|user|>"])
    assert t.user_defined_tokens() == {"\n": 4, "<|user|>": 5}
    assert t.encode("<|user|>hi")[0] == 5
    assert t.decode(t.encode("a<|user|>b")) == "a<|user|>b"


def test_training_errors_are_one_line(tiny_corpus_text):
    with pytest.raises(UserError, match=r"too large for this corpus.*--vocab-size \d+ or less"):
        train_tokenizer([tiny_corpus_text[:5000]], vocab_size=5000)
    with pytest.raises(UserError, match=r"too small.*--vocab-size \d+ or more"):
        train_tokenizer([tiny_corpus_text[:5000]], vocab_size=100)
    with pytest.raises(UserError, match="no text"):
        train_tokenizer([], vocab_size=300)
    with pytest.raises(UserError, match="reserved"):
        train_tokenizer(["abc"], vocab_size=300, special_tokens=["<pad>"])


def test_iterator_errors_propagate():
    def texts():
        yield "some text\n"
        raise UserError("bad input at line 2")

    with pytest.raises(UserError, match="bad input at line 2"):
        train_tokenizer(texts(), vocab_size=300)


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Tokenizer.load(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match="is not a sentencepiece model") as e:
        Tokenizer.load(bad)
    assert "\n" not in str(e.value)


# --- bytes that are not UTF-8 --------------------------------------------------------------


@given(st.binary(max_size=40))
@FAST
def test_any_bytes_encode_keeping_the_undecodable_ones(tok, data):
    """Whatever bytes a command line or stdin holds (Python decodes both with surrogateescape),
    they encode; each byte that is not UTF-8 appears, in order, as its own byte piece."""
    text = data.decode("utf-8", "surrogateescape")
    ids = iter(tok.encode(text))
    escaped = [ord(c) - 0xDC00 for c in text if 0xDC80 <= ord(c) < 0xDD00]
    assert all(tok.piece_to_id(f"<0x{b:02X}>") in ids for b in escaped)


def test_escaped_bytes_around_newlines_and_literal_spaces(tok):
    def byte(b: int) -> int:
        return tok.piece_to_id(f"<0x{b:02X}>")

    text = "a\udcff\n\u2581b\udc80"
    assert tok.encode(text) == tok.encode("a") + [byte(0xFF)] + tok.encode("\n\u2581b") + [
        byte(0x80)
    ]
    assert tok.encode_lines(text) == [
        tok.encode("a") + [byte(0xFF)] + tok.encode("\n"),
        tok.encode("\u2581b") + [byte(0x80)],
    ]


def test_bytes_without_byte_fallback_are_refused_with_their_offset(tiny_corpus_text):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus_text.split("\n")),
        model_writer=model,
        model_type="char",
        minloglevel=2,
        num_threads=1,
    )
    tok = Tokenizer(model.getvalue())
    text = "héllo\nw\udce9rld".encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
    with pytest.raises(UserError, match=r"byte 0xE9 at byte offset 8, and this tokenizer has no"):
        tok.encode(text)
    with pytest.raises(UserError, match=r"lone surrogate U\+DBFF at character 1"):
        tok.encode("a\udbff")


def test_no_mlx_import():
    code = (
        "import sys, mlx_transformer.tokenizer, mlx_transformer.data.dataset, "
        "mlx_transformer.data.prepare; "
        "assert not any(m == 'mlx' or m.startswith('mlx.') for m in sys.modules), 'mlx imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- streaming detokenizer -----------------------------------------------------------------


def stream(tokenizer, ids):
    """Feed ids one at a time; return the segments read after each one (and at the end)."""
    detok = tokenizer.detokenizer()
    segments = []
    for i in ids:
        detok.add_token(i)
        segments.append(detok.last_segment)
    detok.finalize()
    segments.append(detok.last_segment)
    assert detok.text == "".join(segments)
    return segments


@FAST
@given(text=tricky_text)
def test_stream_of_encoded_text(tok, text):
    segments = stream(tok, tok.encode(text))
    assert "".join(segments) == text
    # Never half a character: a segment holds U+FFFD only if the text does.
    assert "\ufffd" in text or not any("\ufffd" in s for s in segments)


def test_stream_holds_bytes_until_a_character_is_whole(tok):
    ids = tok.encode("a😀")
    assert [tok.id_to_piece(i) for i in ids[1:]] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert stream(tok, ids) == ["a", "", "", "", "😀", ""]


@FAST
@given(data=st.data())
def test_stream_of_any_ids_equals_decode(tok, dummy_prefix_tok, data):
    # Any ids at all: controls, unk, stray or invalid byte pieces, leading spaces.
    for t in (tok, dummy_prefix_tok):
        few = st.sampled_from([0, 1, 2, 3, 4, *range(200, 270)])
        ids = data.draw(st.lists(st.one_of(few, st.integers(0, t.vocab_size - 1)), max_size=12))
        assert "".join(stream(t, ids)) == t.decode(ids)


def test_stream_leading_space(tok, dummy_prefix_tok):
    for t in (tok, dummy_prefix_tok):
        ids = t.encode(" Hello world")
        assert "".join(stream(t, ids)) == t.decode(ids)
    assert dummy_prefix_tok.decode(dummy_prefix_tok.encode("Hello world")) == "Hello world"
    assert "".join(stream(tok, tok.encode(" Hello"))) == " Hello"  # ours keeps it


def test_stream_rejects_ids_outside_vocab(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.detokenizer().add_token(tok.vocab_size)
