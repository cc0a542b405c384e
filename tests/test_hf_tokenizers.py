"""A pretrained model's own tokenizer (tokenizer.json): the same ids as transformers'
AutoTokenizer, exact streaming, chat templates rendered as transformers renders them, refusals.

The reference is transformers, reading the same folder (not our own round trip)."""

import json
import random

import pytest
from helpers import fingerprint, save_hf_model
from hf_tokenizer_folders import (
    CHATML,
    LLAMA2,
    byte_level_folder,
    metaspace_folder,
    wordpiece_folder,
)

from mlx_transformer.cli import main
from mlx_transformer.errors import UserError
from mlx_transformer.generate.rules import chat_prompt_ids
from mlx_transformer.hf_tokenizers import HFTokenizer
from mlx_transformer.tokenizer import Tokenizer
from mlx_transformer.tokenizer_files import copy_tokenizer, load_tokenizer, tokenizer_from_files

transformers = pytest.importorskip("transformers")

PROBES = [
    "Hello world",
    "  two  spaces\n\nnew paragraph\n",
    "ROMEO:\nWhat say'st thou? I hope, my lord.\n\n",
    "emoji 😀, CJK 中文, accents é ü, combining e\u0301",
    "tab\tand\r\nCRLF and \x00 nul",
    "\u2581 a literal sentencepiece space",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<s>[INST] special tokens in text [/INST]</s>",
    "",
    " leading space",
    "trailing space ",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_corpus_text):
    root = tmp_path_factory.mktemp("hf_tokenizers")
    return {
        "byte-level": byte_level_folder(root / "byte_level", tiny_corpus_text),
        "metaspace": metaspace_folder(root / "metaspace", tiny_corpus_text),
    }


@pytest.fixture(scope="module", params=["byte-level", "metaspace"])
def pair(request, folders):
    """(ours, transformers') on the same folder."""
    folder = folders[request.param]
    return load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))


def test_the_loader_picks_the_implementation_from_the_files(folders, tiny_tokenizer_path):
    assert isinstance(load_tokenizer(folders["byte-level"]), HFTokenizer)
    assert isinstance(load_tokenizer(folders["byte-level"] / "tokenizer.json"), HFTokenizer)
    assert isinstance(load_tokenizer(tiny_tokenizer_path), Tokenizer)
    assert isinstance(load_tokenizer(tiny_tokenizer_path.parent), Tokenizer)
    bl, ms = load_tokenizer(folders["byte-level"]), load_tokenizer(folders["metaspace"])
    assert (bl.byte_level, bl.byte_fallback) == (True, False)
    assert (ms.byte_level, ms.byte_fallback) == (False, True)


def test_ids_equal_transformers(pair, tiny_corpus_text):
    """Text (add_special_tokens=False, as training data and chat renderings are encoded) and
    generation prompts (transformers' default, bos where the tokenizer adds one)."""
    ours, ref = pair
    lines = tiny_corpus_text.splitlines(keepends=True)[:200]
    texts = PROBES + lines + ["".join(lines[:40])]
    for text in texts:
        assert ours.encode(text) == ref(text, add_special_tokens=False).input_ids, text
        if text:
            assert ours.encode_prompt(text) == ref(text).input_ids, text
    assert ours.vocab_size == len(ref)
    for name in ("bos", "eos", "pad", "unk"):
        ref_id = getattr(ref, f"{name}_token_id")
        assert ours.special_ids[name] == (-1 if ref_id is None else ref_id), name


def test_decode_equals_transformers_and_round_trips(pair, tiny_corpus_text):
    ours, ref = pair
    for text in PROBES + tiny_corpus_text.splitlines(keepends=True)[:100]:
        ids = ours.encode(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        if "\u2581" not in text and "<" not in text and not text.startswith(" "):
            assert ours.decode(ids) == text  # specials and Metaspace's ▁ and first space aside


def _stream(tok, ids):
    detok, segments = tok.detokenizer(), []
    for i in ids:
        detok.add_token(i)
        segments.append(detok.last_segment)
    detok.finalize()
    segments.append(detok.last_segment)
    return detok, segments


def test_streaming_equals_decode_and_never_splits_a_character(pair, tiny_corpus_text):
    """Valid text, and random ids (a sampling model's invalid byte runs): the segments join
    to `decode`, and none but the final flush ends in U+FFFD (half a character)."""
    ours, _ = pair
    rng = random.Random(0)
    cases = [ours.encode(t) for t in PROBES]
    cases += [[rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 16))]
              for _ in range(1500)]  # fmt: skip
    for ids in cases:
        detok, segments = _stream(ours, ids)
        assert detok.text == "".join(segments) == ours.decode(ids), ids
        assert not any(s.endswith("\ufffd") for s in segments[:-1]), (ids, segments)
    emoji = ours.encode("😀")
    assert len(emoji) > 1  # split over byte tokens, shown only once whole
    detok, segments = _stream(ours, emoji)
    assert segments[:-2] == [""] * (len(emoji) - 1) and "".join(segments) == "😀"


@pytest.mark.parametrize("template", [CHATML, LLAMA2])
def test_chat_template_renders_as_transformers(tmp_path, tiny_corpus_text, template):
    folder = byte_level_folder(tmp_path / "t", tiny_corpus_text[:5000], 300, template=template)
    ours = load_tokenizer(folder)
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    chats = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 😀"}],
        [
            {"role": "user", "content": " spaces  and\nnewlines "},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "again"},
        ],
    ]
    if template is CHATML:
        chats.append([{"role": "system", "content": "Be brief."}, *chats[0]])
    for messages in chats:
        for gen in (False, True):
            want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, gen) == want
            assert ours.encode(want) == _ids(
                ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
            )
        # generate --chat's prompt: the messages with the generation prompt, as transformers
        # encodes them for generation.
        want = _ids(ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
        assert chat_prompt_ids(ours, messages) == want
    user = [{"role": "user", "content": "Hi"}]
    assert chat_prompt_ids(ours, "Hi") == chat_prompt_ids(ours, user)


def _ids(result):
    """apply_chat_template(tokenize=True) returns ids (transformers 4) or a BatchEncoding (5)."""
    return list(result["input_ids"] if hasattr(result, "keys") else result)


def test_the_template_raising_is_one_line_naming_the_file(tmp_path, tiny_corpus_text):
    folder = metaspace_folder(tmp_path / "t", tiny_corpus_text[:5000], 400)
    tok = load_tokenizer(folder)
    with pytest.raises(UserError, match=r"tokenizer_config.json field chat_template.*alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "first"}])
    (folder / "chat_template.jinja").write_text("{{ messages[0].content + 1 }}")
    with pytest.raises(UserError, match=r"chat_template.jinja: the chat template failed"):
        load_tokenizer(folder).apply_chat_template([{"role": "user", "content": "x"}])
    (folder / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(UserError, match=r"chat_template.jinja: .*syntax"):
        load_tokenizer(folder).apply_chat_template([{"role": "user", "content": "x"}])


def test_a_tokenizer_without_template_refuses_chat(tmp_path, tiny_corpus_text, tiny_tokenizer_path):
    folder = byte_level_folder(tmp_path / "t", tiny_corpus_text[:5000], 300, template=None)
    for tok in (load_tokenizer(folder), load_tokenizer(tiny_tokenizer_path)):
        with pytest.raises(UserError, match="no chat template"):
            tok.apply_chat_template([{"role": "user", "content": "x"}], True)


def test_wordpiece_and_broken_files_are_refused_in_one_line(tmp_path, tiny_corpus_text):
    with pytest.raises(UserError, match=r"tokenizer.json: model.type 'WordPiece' is not supported"):
        load_tokenizer(wordpiece_folder(tmp_path / "wp", tiny_corpus_text[:5000]))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    with pytest.raises(UserError, match=r"bad/tokenizer.json cannot be loaded by the tokenizers"):
        load_tokenizer(bad)
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot be loaded"):
        load_tokenizer(bad)
    good = byte_level_folder(tmp_path / "good", tiny_corpus_text[:5000], 300)
    (good / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"tokenizer_config.json: a JSON list, not an object"):
        load_tokenizer(good)
    with pytest.raises(UserError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)


def test_check_fits_allows_padded_embeddings_and_refuses_fewer(folders):
    tok = load_tokenizer(folders["byte-level"])
    tok.check_fits(tok.vocab_size)
    tok.check_fits(tok.vocab_size + 64)  # HF models often pad the embedding rows
    with pytest.raises(UserError, match=r"tokenizer.json has 600 ids but the model's vocab_size"):
        tok.check_fits(tok.vocab_size - 1)


def test_files_copy_rebuild_and_fingerprint(folders, tmp_path):
    """copy_tokenizer carries every file; a worker rebuilds the same tokenizer from the bytes;
    the fingerprint covers the config files too (a changed template is another tokenizer)."""
    source = folders["byte-level"]
    assert copy_tokenizer(source / "tokenizer.json", tmp_path) == [
        "tokenizer.json", "tokenizer_config.json"
    ]  # fmt: skip
    tok, copy = load_tokenizer(source), load_tokenizer(tmp_path)
    assert copy.checksum == tok.checksum
    assert tokenizer_from_files(tok.files).encode("To be, or not") == tok.encode("To be, or not")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(tmp_path).checksum != tok.checksum


def test_text_that_is_not_utf8_is_one_line(folders):
    tok = load_tokenizer(folders["byte-level"])
    with pytest.raises(UserError, match="not valid UTF-8"):
        tok.encode("ab\udcff")


# --- convert --from-hf: the tokenizer comes along, and must fit the embedding rows ---------------


def tiny_hf_model(folder, vocab_size: int):
    pytest.importorskip("torch")
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    save_hf_model(lambda: transformers.LlamaForCausalLM(config), folder, o1_weights=False)
    return folder


def test_convert_imports_the_tokenizer_files(tmp_path, tiny_corpus_text, capsys):
    """tokenizer.json with its config, special tokens and chat_template.jinja, byte for byte;
    embedding rows beyond the vocabulary (padding) are fine."""
    hf = byte_level_folder(tmp_path / "hf", tiny_corpus_text[:20000], 300)
    tiny_hf_model(hf, 320)
    (hf / "special_tokens_map.json").write_text('{"eos_token": "<|im_end|>"}')
    (hf / "chat_template.jinja").write_text(CHATML)
    out = tmp_path / "ckpt"
    assert main(["convert", "--from-hf", str(hf), "--out", str(out)]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"):  # fmt: skip
        assert (out / name).read_bytes() == (hf / name).read_bytes(), name
    assert load_tokenizer(out).checksum == load_tokenizer(hf).checksum
    assert main(["info", str(out)]) == 0
    assert "tokenizer                tokenizer.json" in capsys.readouterr().out
    # ... and back: convert --to-hf writes the same files, which transformers reads.
    back = tmp_path / "back"
    assert main(["convert", "--to-hf", str(out), "--out", str(back)]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (back / name).read_bytes() == (hf / name).read_bytes(), name
    assert not (back / "tokenizer.model").exists()
    ref = transformers.AutoTokenizer.from_pretrained(str(back))
    text = "<|im_start|>user\nWhat, ho! 😀<|im_end|>\n"
    assert ref(text, add_special_tokens=False).input_ids == load_tokenizer(out).encode(text)
    assert json.loads((back / "generation_config.json").read_text())["eos_token_id"] == 2
    assert "the model's own" in (back / "README.md").read_text()


def test_convert_refuses_a_tokenizer_that_does_not_fit_or_load(tmp_path, tiny_corpus_text, capsys):
    hf = byte_level_folder(tmp_path / "hf", tiny_corpus_text[:20000], 300)
    tiny_hf_model(hf, 200)  # fewer embedding rows than ids
    out = tmp_path / "ckpt"
    before = fingerprint(tmp_path)
    capsys.readouterr()
    assert main(["convert", "--from-hf", str(hf), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "hf/tokenizer.json has 300 ids but the model's vocab_size (embedding rows) is 200" in err
    assert fingerprint(tmp_path) == before
    (hf / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    before = fingerprint(tmp_path)
    assert main(["convert", "--from-hf", str(hf), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hf/tokenizer.json cannot be loaded" in err
    assert fingerprint(tmp_path) == before


def test_a_folder_with_both_files_is_read_as_transformers_reads_it(
    tmp_path, tiny_corpus_text, tiny_tokenizer_path
):
    """Llama 2's folders hold tokenizer.model (with a dummy prefix) and tokenizer.json: the json
    is used. Folders written here from a sentencepiece model we trained (export, --to-hf) hold
    both too: the model is used (the json was made from it)."""
    import io

    import sentencepiece as spm

    from mlx_transformer.checkpoint.hf_tokenizer import write_hf_tokenizer_files
    from mlx_transformer.tokenizer_files import find_tokenizer

    llama2 = metaspace_folder(tmp_path / "llama2", tiny_corpus_text[:20000], 400)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus_text[:20000].split("\n")), model_writer=model,
        vocab_size=400, byte_fallback=True, minloglevel=2, num_threads=1,
    )  # fmt: skip
    (llama2 / "tokenizer.model").write_bytes(model.getvalue())
    assert find_tokenizer(llama2) == llama2 / "tokenizer.json"
    assert isinstance(load_tokenizer(llama2), HFTokenizer)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "tokenizer.model").write_bytes(tiny_tokenizer_path.read_bytes())
    write_hf_tokenizer_files(tiny_tokenizer_path, ours)
    assert find_tokenizer(ours) == ours / "tokenizer.model"
    assert isinstance(load_tokenizer(ours), Tokenizer)
