"""The Hugging Face tokenizer files give our ids in `tokenizers` and transformers' AutoTokenizer."""

from __future__ import annotations

import hashlib
import json

import pytest

from mlx_transformer.checkpoint.hf_tokenizer import (
    HF_TOKENIZER_FILES,
    hf_tokenizer_files,
    write_hf_tokenizer_files,
)
from mlx_transformer.data.tokenizer_training import train_tokenizer
from mlx_transformer.errors import UserError
from mlx_transformer.tokenizer import Tokenizer

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

PROBES = [
    "",
    "hello world",
    "ROMEO:\nWhat light through yonder window breaks?\n",
    " leading space",
    "trailing space ",
    "multiple   spaces  inside",
    "   ",
    "\n",
    "\n\n\nthree newlines first",
    "ends with newlines\n\n",
    "  \n  spaces around a newline  \n",
    "tab\tand\rcarriage\r\nreturn",
    "héllo wörld, naïve café",
    "日本語のテキスト",
    "emoji 😀🎉 and ZWJ 👩‍👩‍👧",
    "control \x00\x01\x7f bytes",
    "<s> literal specials </s> <unk><pad>",
    "<0x41> is not a byte piece",
    "digits 1234567890",
    "mixed: ∑ x² ≈ π, «quotes» — dash…",
]


@pytest.fixture(scope="module", params=["bpe", "char"])
def hf_tokenizer_dir(request, tmp_path_factory, tiny_tokenizer_path, tiny_char_tokenizer_path):
    """Our tokenizer and a folder holding its Hugging Face files."""
    path = tiny_tokenizer_path if request.param == "bpe" else tiny_char_tokenizer_path
    folder = tmp_path_factory.mktemp(f"hf_{request.param}")
    assert write_hf_tokenizer_files(path, folder, model_max_length=64) == list(HF_TOKENIZER_FILES)
    return Tokenizer.load(path), folder


def raw_tokenizer(folder):
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    # Not stored in tokenizer.json: transformers reads it from tokenizer_config.json.
    tok.encode_special_tokens = True
    return tok


def test_tokenizers_library_gives_our_ids(hf_tokenizer_dir):
    ours, folder = hf_tokenizer_dir
    theirs = raw_tokenizer(folder)
    for text in PROBES:
        ids = ours.encode(text)
        assert theirs.encode(text, add_special_tokens=False).ids == ids, text
        assert theirs.decode(ids) == text


def test_auto_tokenizer_gives_our_ids(hf_tokenizer_dir):
    ours, folder = hf_tokenizer_dir
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for text in PROBES:
        ids = ours.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ids, text
        # add_special_tokens (the default) adds nothing: our prompts carry no bos
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids) == text
    # control ids decode to nothing, as in sentencepiece
    ids = [ours.bos_id, *ours.encode("a b"), ours.eos_id]
    assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids) == "a b"
    ids_of = {"bos": theirs.bos_token_id, "eos": theirs.eos_token_id, "pad": theirs.pad_token_id}
    assert ids_of == {"bos": 1, "eos": 2, "pad": 3}
    assert theirs.unk_token_id == 0 and theirs.model_max_length == 64


# Text holding sentencepiece's own space mark: ours encodes it as its three bytes, tokenizer.json
# (spaces spelled "▁", as Llama 2's and as onnxruntime-genai's tokenizer needs) as a space.
SPACE_MARK_PROBES = ["\u2581", "a\u2581b \u2581 \u2581\u2581"]


def test_a_literal_space_mark_is_the_one_difference(hf_tokenizer_dir):
    ours, folder = hf_tokenizer_dir
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for text in SPACE_MARK_PROBES:
        assert theirs.decode(ours.encode(text)) == text  # our ids still decode exactly
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(
            text.replace("\u2581", " ")
        )


def test_whole_corpus_encodes_the_same(hf_tokenizer_dir, tiny_corpus_text):
    ours, folder = hf_tokenizer_dir
    theirs = raw_tokenizer(folder)
    lines = tiny_corpus_text.split("\n")
    chunks = ["\n".join(lines[i : i + 40]) for i in range(0, len(lines), 40)]
    got = [e.ids for e in theirs.encode_batch(chunks, add_special_tokens=False)]
    assert got == [ours.encode(c) for c in chunks]


def test_user_defined_tokens_are_matched_whole(tmp_path, tiny_corpus_text):
    path = tmp_path / "tokenizer.model"
    ours = train_tokenizer(
        [tiny_corpus_text],
        path,
        vocab_size=400,
        special_tokens=["<|user|>", "<|end|>"],
        num_threads=1,
    )
    write_hf_tokenizer_files(ours, tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ["<|user|>hi there<|end|>\n", "x<|user|> y", "<|user", "<|end|><|end|>"]:
        ids = ours.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ids, text
        assert theirs.decode(ids) == text
    assert ours.encode("<|user|>") == [5]


def test_generation_and_special_token_files(tiny_tokenizer_path):
    files = hf_tokenizer_files(tiny_tokenizer_path)
    assert files["generation_config.json"] == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
    }
    assert files["special_tokens_map.json"] == {
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
    }
    config = files["tokenizer_config.json"]
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "model_max_length" not in config
    # the same content from the path, the bytes or a Tokenizer
    data = tiny_tokenizer_path.read_bytes()
    assert hf_tokenizer_files(data) == files == hf_tokenizer_files(Tokenizer(data))


def _sha256s(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_unigram_model_is_refused_and_nothing_is_written(tmp_path, tiny_corpus_text):
    ours = train_tokenizer([tiny_corpus_text], vocab_size=400, model_type="unigram", num_threads=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")  # what sat there before stays
    before = _sha256s(out)
    with pytest.raises(UserError, match="unigram model .*--model-type bpe or char") as e:
        write_hf_tokenizer_files(ours, out)
    assert "\n" not in str(e.value)
    assert _sha256s(out) == before


def test_foreign_normalization_is_refused(tiny_tokenizer_path, tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tiny_tokenizer_path.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = True
    with pytest.raises(UserError, match="dummy prefix space; it removes extra whitespace"):
        write_hf_tokenizer_files(proto.SerializeToString(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_files_are_plain_json(hf_tokenizer_dir):
    _, folder = hf_tokenizer_dir
    for name in HF_TOKENIZER_FILES:
        assert isinstance(json.loads((folder / name).read_text(encoding="utf-8")), dict)
