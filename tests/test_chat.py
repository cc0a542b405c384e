"""Chat data: `prepare` renders {"messages": [...]} with the tokenizer's chat template, the loss on
assistant turns only (transformers' assistant mask is the reference); a vocabulary past 65536
ids is stored as uint32; bad chats, templates and tokenizers are one line, exit 2, nothing
written; `convert --from-hf` imports the tokenizer and refuses one that does not fit."""

import json

import numpy as np
import pytest
from helpers import fingerprint
from hf_tokenizer_folders import byte_level_folder, metaspace_folder

from mlx_transformer.cli import main
from mlx_transformer.data.dataset import load_dataset
from mlx_transformer.tokenizer_files import load_tokenizer

transformers = pytest.importorskip("transformers")

# ChatML with transformers' {% generation %} marks around what the assistant says, so that
# transformers' `return_assistant_tokens_mask` gives the reference mask.
CHATML_MARKED = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CHATS = [
    [{"role": "user", "content": "Who speaks first?"}, {"role": "assistant", "content": "I do."}],
    [
        {"role": "system", "content": "Answer in verse."},
        {"role": "user", "content": "What, ho!"},
        {"role": "assistant", "content": " Peace, ho! 😀"},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "Then\n\nsilence."},
    ],
    [
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "Two"},
        {"role": "user", "content": "Three, and no answer"},
    ],
]


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory, tiny_corpus_text):
    root = tmp_path_factory.mktemp("chat_tok")
    return byte_level_folder(root / "tok", tiny_corpus_text[:20000], 400, template=CHATML_MARKED)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def examples(dataset):
    """Every example of both splits as (ids, prompt_len), in corpus order per split."""
    out = []
    for split in dataset.splits.values():
        for shard, start, prompt_len, total_len in split.examples.tolist():
            out.append((split.shards[shard][start : start + total_len].tolist(), prompt_len))
    return out


def test_the_loss_covers_exactly_transformers_assistant_tokens(chat_tokenizer, tmp_path):
    """Each assistant turn is one example: the conversation before it as the prompt, the turn as
    the completion. Mapped onto the whole conversation, the completions are exactly the tokens
    transformers marks as the assistant's, and the ids are transformers'."""
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    out = tmp_path / "ds"
    assert main(["prepare", "--data", str(data), "--tokenizer", str(chat_tokenizer),
                 "--out", str(out), "--val-fraction", "0"]) == 0  # fmt: skip
    ref = transformers.AutoTokenizer.from_pretrained(str(chat_tokenizer))
    got = iter(examples(load_dataset(out)))
    for messages in CHATS:
        full = ref.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, want_mask = list(full["input_ids"]), list(full["assistant_masks"])
        mask = [0] * len(ids)
        for _ in range(sum(m["role"] == "assistant" for m in messages)):
            example, prompt_len = next(got)
            assert example == ids[: len(example)]  # a prefix of transformers' ids
            mask[prompt_len : len(example)] = [1] * (len(example) - prompt_len)
        assert sum(want_mask) > 0 and mask == want_mask
    assert next(got, None) is None
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "finetune" and manifest["dtype"] == "uint16"
    assert manifest["splits"]["train"]["examples"] == 4
    # The template ends each turn with <|im_end|>, the eos: no second eos is added.
    assert load_tokenizer(out).eos_id == ref.convert_tokens_to_ids("<|im_end|>")


def test_a_turn_not_ending_in_eos_gets_one(tmp_path, tiny_corpus_text):
    """With eos = <|endoftext|> (a base model's), each assistant turn is followed by eos, so the
    model learns to stop; <|im_end|> stays part of the turn."""
    folder = byte_level_folder(tmp_path / "tok", tiny_corpus_text[:20000], 400)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHATS[0]}])
    out = tmp_path / "ds"
    assert main(["prepare", "--data", str(data), "--tokenizer", str(folder), "--out", str(out),
                 "--val-fraction", "0"]) == 0  # fmt: skip
    tok = load_tokenizer(out)
    [(ids, prompt_len)] = examples(load_dataset(out))
    assert tok.decode(ids[prompt_len:]) == "I do.\n"  # special tokens decode to nothing
    assert ids[-3:-1] == tok.encode("<|im_end|>\n") and ids[-1] == tok.eos_id


BAD_CHATS = [
    ({"messages": [{"role": "user", "content": "no answer"}]}, r"chat.jsonl:2: no assistant turn"),
    ({"messages": []}, r'chat.jsonl:2: "messages" must be a non-empty list'),
    ({"messages": [{"role": "user", "content": 3}]}, r"chat.jsonl:2: messages\[0\].content must"),
    ({"messages": [{"content": "x"}]}, r'chat.jsonl:2: messages\[0\] needs a string "role"'),
]


@pytest.mark.parametrize("record, message", BAD_CHATS)
def test_bad_chats_are_one_line_naming_line_and_field(
    record, message, chat_tokenizer, tmp_path, capsys
):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHATS[0]}, record])
    before = fingerprint(tmp_path)
    args = ["prepare", "--data", str(data), "--tokenizer", str(chat_tokenizer)]
    assert main([*args, "--out", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mlx-transformer prepare: error: ")
    assert __import__("re").search(message, err), err
    assert fingerprint(tmp_path) == before  # nothing written


def test_template_failure_missing_template_and_missing_tokenizer(
    tmp_path, tiny_corpus_text, capsys
):
    # Llama 2's template raises when roles do not alternate user/assistant.
    llama2 = metaspace_folder(tmp_path / "llama2", tiny_corpus_text[:20000], 400)
    plain = byte_level_folder(tmp_path / "plain", tiny_corpus_text[:20000], 400, template=None)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHATS[1]}])
    cases = [
        (["--tokenizer", str(llama2)], r"chat.jsonl:1: .*llama2/tokenizer_config.json field "
         r"chat_template: the chat template failed to render: Conversation roles must alternate"),
        (["--tokenizer", str(plain)], r"chat.jsonl:1: .*plain/tokenizer.json: the tokenizer has "
         r"no chat template"),
        ([], r"chat.jsonl:1: chat data .* pass --tokenizer CKPT"),
        (["--tokenizer", str(tmp_path / "broken")], r"broken/tokenizer.json cannot be loaded"),
    ]  # fmt: skip
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    before = fingerprint(tmp_path)
    for extra, message in cases:
        assert main(["prepare", "--data", str(data), *extra, "--out", str(tmp_path / "ds")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and __import__("re").search(message, err), err
    assert fingerprint(tmp_path) == before


def big_vocab_tokenizer(folder, size: int = 70_000):
    """A byte-level BPE tokenizer.json of `size` ids whose merges give ids past 65535."""
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    filler = size - len(vocab) - 4
    vocab.update({f"\u3400filler{i}": len(vocab) + i for i in range(filler)})
    for piece in ("Th", "The", "Ġk", "Ġking"):
        vocab[piece] = len(vocab)
    merges = [["T", "h"], ["Th", "e"], ["Ġ", "k"], ["Ġk", "ing"]]
    vocab["ing"] = len(vocab)
    merges.insert(2, ["i", "ng"])
    vocab["ng"] = len(vocab)
    merges.insert(2, ["n", "g"])
    eos = len(vocab)
    spec = {
        "version": "1.0",
        "added_tokens": [{"id": eos, "content": "<|endoftext|>", "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False,
                          "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }  # fmt: skip
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return folder


def test_a_vocabulary_past_65536_is_stored_as_uint32(tmp_path):
    tok_dir = big_vocab_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(tok_dir)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    text = "The king, The king!\n" * 50
    assert tok.vocab_size > 65536 and max(tok.encode(text)) > 65535
    assert tok.encode(text) == ref(text, add_special_tokens=False).input_ids
    (tmp_path / "corpus.txt").write_text(text)
    out = tmp_path / "ds"
    data, tokenizer = tmp_path / "corpus.txt", tok_dir / "tokenizer.json"
    assert main(["prepare", "--data", str(data), "--tokenizer", str(tokenizer),
                 "--out", str(out), "--val-fraction", "0"]) == 0  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "uint32" and manifest["vocab_size"] == tok.vocab_size
    stored = np.fromfile(out / "train_000.bin", np.dtype("<u4"))
    assert stored.tolist() == tok.encode(text) + [tok.eos_id]
    dataset = load_dataset(out, tokenizer=tok)
    assert dataset.splits["train"].shards[0].tolist() == stored.tolist()


def test_generate_chat_needs_a_chat_template(tmp_path, tiny_tokenizer_path, capsys):
    """A model trained here (sentencepiece, no template): --chat is one line, exit 2."""
    import mlx.core as mx

    from mlx_transformer.checkpoint.mlx_io import save_checkpoint
    from mlx_transformer.config import ModelConfig
    from mlx_transformer.model import Transformer

    mx.random.seed(0)
    model = Transformer(ModelConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, max_position_embeddings=64))  # fmt: skip
    save_checkpoint(tmp_path / "ckpt", model, tokenizer_path=tiny_tokenizer_path)
    args = ["--model", str(tmp_path / "ckpt"), "--prompt", "hi", "--chat", "--max-tokens", "2"]
    assert main(["generate", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the tokenizer has no chat template" in err
    assert main(["generate", *args[:-3], "--max-tokens", "2"]) == 0  # plain prompts still work


def test_prompt_completion_examples_start_as_transformers_encodes_a_prompt(
    tmp_path, tiny_corpus_text
):
    """A tokenizer that adds BOS (Llama 2's post-processor): each prompt starts with it, as a
    generation prompt does; the completion is plain text followed by eos."""
    folder = metaspace_folder(tmp_path / "tok", tiny_corpus_text[:20000], 400)
    records = [{"prompt": "Who speaks first?", "completion": " First Citizen."}] * 3
    data = write_jsonl(tmp_path / "qa.jsonl", records)
    out = tmp_path / "ds"
    assert main(["prepare", "--data", str(data), "--tokenizer", str(folder), "--out", str(out),
                 "--val-fraction", "0"]) == 0  # fmt: skip
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    prompt = ref(records[0]["prompt"]).input_ids
    completion = ref(records[0]["completion"], add_special_tokens=False).input_ids
    assert prompt[0] == ref.bos_token_id
    want = (prompt + completion + [ref.eos_token_id], len(prompt))
    assert examples(load_dataset(out)) == [want] * 3
    assert load_tokenizer(out).encode_prompt(records[0]["prompt"]) == prompt
