"""Data pipeline: prepare (shards, splits, manifest, atomicity) and numpy batching; its errors are
in test_data_errors."""

import json

import numpy as np
import pytest

from mlx_transformer.data import encode as prepare_encode
from mlx_transformer.data import prepare as prepare_module
from mlx_transformer.data import sources as prepare_sources
from mlx_transformer.data.batches import FinetuneBatches, PretrainBatches, val_windows
from mlx_transformer.data.dataset import load_dataset
from mlx_transformer.data.prepare import prepare
from mlx_transformer.errors import UserError


@pytest.fixture(scope="module")
def pretrain_dir(tmp_path_factory, tiny_corpus_text, tiny_tokenizer_path):
    root = tmp_path_factory.mktemp("pretrain")
    (root / "corpus.txt").write_text(tiny_corpus_text, encoding="utf-8")
    out = root / "ds"
    prepare([root / "corpus.txt"], out, tokenizer=tiny_tokenizer_path, shard_tokens=4000)
    return out


def all_tokens(ds, split):
    return np.concatenate([np.asarray(s) for s in ds.splits[split].shards])


# --- prepare: what lands on disk -----------------------------------------------------------


def test_shards_hold_exactly_the_encoded_corpus(pretrain_dir, tok, tiny_corpus_text):
    ds = load_dataset(pretrain_dir, tokenizer=tok)
    stream = np.concatenate([all_tokens(ds, "train"), all_tokens(ds, "val")])
    expected = tok.encode(tiny_corpus_text, eos=True)  # one document, then eos
    np.testing.assert_array_equal(stream, expected)
    m = ds.manifest
    assert m["dtype"] == "uint16" and ds.splits["train"].shards[0].dtype == np.uint16
    assert m["split_by"] == "stream" and m["kind"] == "pretrain"
    assert [s["tokens"] for s in m["splits"]["train"]["shards"]][:-1] == [4000] * (
        len(m["splits"]["train"]["shards"]) - 1
    )
    for name in ("train", "val"):
        assert ds.splits[name].tokens == sum(s["tokens"] for s in m["splits"][name]["shards"])
    # The split falls at a line end near 90% of the bytes; bytes add up to the corpus.
    n_train_bytes = m["splits"]["train"]["bytes"]
    assert n_train_bytes + m["splits"]["val"]["bytes"] == len(tiny_corpus_text.encode())
    assert tiny_corpus_text.encode()[n_train_bytes - 1 : n_train_bytes] == b"\n"
    assert abs(n_train_bytes / len(tiny_corpus_text.encode()) - 0.9) < 0.01
    assert ds.bytes_per_token("val") == pytest.approx(
        m["splits"]["val"]["bytes"] / m["splits"]["val"]["tokens"]
    )
    assert m["tokenizer"]["sha256"] == tok.checksum
    assert m["tokenizer"]["special_ids"] == {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
    assert (pretrain_dir / "tokenizer.model").read_bytes() == tok.model_bytes


def test_folder_of_documents_splits_by_document(tmp_path, tok, tiny_corpus_text):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    lines = tiny_corpus_text.splitlines(keepends=True)
    texts = ["".join(lines[i : i + 50]) for i in range(0, 1000, 50)]  # 20 documents
    for i, text in enumerate(texts):
        folder = docs / "sub" if i % 2 else docs
        (folder / f"{i:02d}.md").write_text(text, encoding="utf-8")
    (docs / "ignored.bin").write_bytes(b"\xff\xfe")
    (docs / ".hidden.txt").write_text("not read")
    m = prepare([docs], tmp_path / "ds", tokenizer=tok.path, val_fraction=0.2)
    order = sorted(docs.rglob("*.md"))
    assert [s["path"] for s in m["sources"]] == [str(p) for p in order]
    assert m["split_by"] == "document"
    assert m["splits"]["val"]["documents"] == 4 and m["splits"]["train"]["documents"] == 16
    ds = load_dataset(tmp_path / "ds")
    ids = [tok.encode(p.read_text(encoding="utf-8"), eos=True) for p in order]
    # Every 5th document goes to val (evenly spread), the rest to train, in order.
    val = [i for i in range(20) if (i + 1) * 4 // 20 > i * 4 // 20]
    expect_val = np.concatenate([ids[i] for i in val])
    expect_train = np.concatenate([ids[i] for i in range(20) if i not in val])
    np.testing.assert_array_equal(all_tokens(ds, "val"), expect_val)
    np.testing.assert_array_equal(all_tokens(ds, "train"), expect_train)


def test_parallel_workers_write_identical_shards(tmp_path, corpus_file, tok, monkeypatch):
    for module in (prepare_sources, prepare_encode):  # both read it: blocks, tasks, pool size
        monkeypatch.setattr(module, "BLOCK_BYTES", 4096)  # many tasks from 50 KB
    prepare([corpus_file], tmp_path / "one", tokenizer=tok.path, workers=1)
    prepare([corpus_file], tmp_path / "two", tokenizer=tok.path, workers=2)
    for name in ("train_000.bin", "val_000.bin"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    np.testing.assert_array_equal(
        np.concatenate([all_tokens(load_dataset(tmp_path / "one"), s) for s in ("train", "val")]),
        tok.encode(corpus_file.read_text(encoding="utf-8"), eos=True),
    )


def test_trains_tokenizer_from_embedded_corpus_by_default(tmp_path, monkeypatch, corpus_file):
    monkeypatch.setattr(prepare_module, "default_corpus_path", lambda: corpus_file)
    m = prepare(None, tmp_path / "ds", vocab_size=320, model_type="bpe", special_tokens=["<x>"])
    assert m["vocab_size"] == 320 and m["tokenizer"]["model_type"] == "bpe"
    assert m["tokenizer"]["user_defined_tokens"] == {"\n": 4, "<x>": 5}
    assert m["sources"][0]["path"] == str(corpus_file)


def test_rerun_is_a_no_op_and_overwrite_replaces(tmp_path, corpus_file, tok):
    out = tmp_path / "ds"
    prepare([corpus_file], out, tokenizer=tok.path)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    prepare([corpus_file], out, tokenizer=tok.path)  # same request: nothing to do
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="holds a different dataset.*--overwrite"):
        prepare([corpus_file], out, tokenizer=tok.path, val_fraction=0.2)
    m = prepare([corpus_file], out, tokenizer=tok.path, val_fraction=0.2, overwrite=True)
    assert load_dataset(out).manifest["val_fraction"] == m["val_fraction"] == 0.2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "ds"]  # no leftovers


def test_replace_invalid_utf8(tmp_path, tok):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good line\nbad \xff byte\n" * 20)
    m = prepare([bad], tmp_path / "ds", tokenizer=tok.path, replace_invalid_utf8=True)
    ds = load_dataset(tmp_path / "ds")
    text = tok.decode(np.concatenate([all_tokens(ds, "train"), all_tokens(ds, "val")]))
    assert text == bad.read_bytes().decode("utf-8", "replace")
    total = m["splits"]["train"]["bytes"] + m["splits"]["val"]["bytes"]
    assert total == len(text.encode("utf-8"))  # bytes of the text the model sees


def test_dataset_with_another_tokenizer(pretrain_dir, tiny_char_tokenizer_path):
    with pytest.raises(UserError, match="encoded with a different tokenizer"):
        load_dataset(pretrain_dir, tokenizer=tiny_char_tokenizer_path)


# --- pretraining batches -------------------------------------------------------------------


def test_windows_are_slices_and_targets_shift(pretrain_dir):
    ds = load_dataset(pretrain_dir)
    batches = PretrainBatches(ds, batch_size=8, context=16, seed=3)
    shards = [np.asarray(s) for s in ds.splits["train"].shards]
    for _ in range(3):
        b = next(batches)
        assert b.inputs.shape == b.targets.shape == (8, 16) and b.inputs.dtype == np.int32
        np.testing.assert_array_equal(b.inputs[:, 1:], b.targets[:, :-1])
        for row_in, row_t in zip(b.inputs, b.targets):
            window = np.concatenate([row_in, row_t[-1:]])
            assert any(
                (np.lib.stride_tricks.sliding_window_view(s, 17) == window).all(1).any()
                for s in shards
            )


def test_batches_are_seeded_and_ranks_differ(pretrain_dir):
    ds = load_dataset(pretrain_dir)
    a = [next(PretrainBatches(ds, 4, 16, seed=1)).inputs for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])
    r0 = PretrainBatches(ds, 4, 16, seed=1, rank=0, world_size=2).batch(0).inputs
    r1 = PretrainBatches(ds, 4, 16, seed=1, rank=1, world_size=2).batch(0).inputs
    assert not np.array_equal(r0, r1)


def test_resume_gives_identical_next_batches(pretrain_dir):
    ds = load_dataset(pretrain_dir)
    run = PretrainBatches(ds, 4, 16, seed=7)
    for _ in range(5):
        next(run)
    state = json.loads(json.dumps(run.state_dict()))
    expected = [next(run) for _ in range(3)]
    resumed = PretrainBatches(ds, 4, 16, seed=0)
    resumed.load_state_dict(state)
    for e in expected:
        b = next(resumed)
        np.testing.assert_array_equal(b.inputs, e.inputs)
        np.testing.assert_array_equal(b.targets, e.targets)
    with pytest.raises(UserError, match="another dataset"):
        resumed.load_state_dict({**state, "split_tokens": 1})


def test_val_windows_cover_the_split_once(pretrain_dir):
    ds = load_dataset(pretrain_dir)
    targets = []
    for b in val_windows(ds, batch_size=3, context=10):
        assert b.inputs.shape[1] == 10 and b.loss_mask.shape == b.inputs.shape
        targets.extend(b.targets[b.loss_mask == 1].tolist())
    expected = np.concatenate([np.asarray(s)[1:] for s in ds.splits["val"].shards])
    np.testing.assert_array_equal(targets, expected)


# --- fine-tuning ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finetune_dir(tmp_path_factory, tiny_tokenizer_path):
    root = tmp_path_factory.mktemp("finetune")
    examples = [
        {"prompt": f"Q{i}: who speaks?", "completion": " First Citizen." * (1 + i % 4)}
        for i in range(30)
    ]
    (root / "ft.jsonl").write_text("\n".join(json.dumps(e) for e in examples) + "\n")
    out = root / "ds"
    prepare([root / "ft.jsonl"], out, tokenizer=tiny_tokenizer_path, shard_tokens=300)
    return out, examples


def test_finetune_examples_store_prompt_and_completion(finetune_dir, tok):
    out, examples = finetune_dir
    ds = load_dataset(out)
    assert ds.kind == "finetune" and ds.manifest["splits"]["val"]["examples"] == 3
    assert len(ds.splits["train"].shards) > 1  # examples never straddle shards
    seen = []
    for split in ("train", "val"):
        for shard, start, prompt_len, total_len in ds.splits[split].examples.tolist():
            ids = np.asarray(ds.splits[split].shards[shard][start : start + total_len]).tolist()
            seen.append((tok.decode(ids[:prompt_len]), tok.decode(ids[prompt_len:])))
            assert ids[-1] == tok.eos_id
    assert sorted(seen) == sorted((e["prompt"], e["completion"]) for e in examples)


def test_finetune_batches_masks(finetune_dir, tok):
    out, _ = finetune_dir
    ds = load_dataset(out)
    batches = FinetuneBatches(ds, batch_size=4, context=64, seed=0)
    b = batches.batch(0)
    rows = ds.splits["train"].examples[batches.example_indices(0)]
    assert b.inputs.shape[1] % 8 == 0
    for i, (shard, start, prompt_len, total_len) in enumerate(rows.tolist()):
        ids = np.asarray(ds.splits["train"].shards[shard][start : start + total_len])
        n = total_len - 1  # inputs that have a target
        np.testing.assert_array_equal(b.inputs[i, :n], ids[:-1])
        np.testing.assert_array_equal(b.targets[i, :n], ids[1:])
        assert b.attention_mask[i].tolist() == [1] * n + [0] * (b.inputs.shape[1] - n)
        assert (b.targets[i, n:] == tok.pad_id).all()
        # The loss covers exactly the completion (and its eos) among the targets.
        np.testing.assert_array_equal(b.targets[i][b.loss_mask[i] == 1], ids[prompt_len:])


def test_finetune_truncation_and_resume(finetune_dir):
    out, _ = finetune_dir
    ds = load_dataset(out)
    short = FinetuneBatches(ds, batch_size=4, context=8, seed=0)
    b = short.batch(0)
    assert b.inputs.shape == (4, 8) and b.attention_mask.all()  # all cut to context + 1
    run = FinetuneBatches(ds, batch_size=4, context=64, seed=5, rank=1, world_size=2)
    for _ in range(9):  # past an epoch (27 train examples / 8 per global step)
        next(run)
    state = json.loads(json.dumps(run.state_dict()))
    expected = next(run)
    resumed = FinetuneBatches(ds, batch_size=4, context=64, seed=0, rank=1, world_size=2)
    resumed.load_state_dict(state)
    got = next(resumed)
    np.testing.assert_array_equal(got.inputs, expected.inputs)
    np.testing.assert_array_equal(got.loss_mask, expected.loss_mask)
