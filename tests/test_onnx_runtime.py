"""The deployment runtime: samplers, generation against MLX, batching, stops, streaming, the CLI,
and the promise that it runs where MLX cannot be imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import BLOCK_MLX
from test_model import CONFIGS, random_model, tiny_config

from export import export_onnx, sampling
from export.runtime import OnnxGenerator
from export.session import left_pad
from mlx_transformer.checkpoint.mlx_io import save_checkpoint
from mlx_transformer.cli import main
from mlx_transformer.data.tokenizer_training import train_tokenizer
from mlx_transformer.generate import sample as mlx_sample
from mlx_transformer.model import make_cache

ROOT = Path(__file__).resolve().parent.parent


def mlx_greedy(model, prompt: list[int], n: int) -> list[int]:
    cache = make_cache(model)
    logits = model(mx.array([prompt]), cache=cache)
    tokens = []
    for _ in range(n):
        token = int(mx.argmax(logits[0, -1]))
        tokens.append(token)
        logits = model(mx.array([[token]]), cache=cache)
    return tokens


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A character-level sentencepiece model trained on a few KB of this repository's text."""
    text = (ROOT / "mlx_transformer/model.py").read_text()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer([text], path, model_type="char", num_threads=1)
    return path


@pytest.fixture(scope="module")
def text_model(tokenizer_path, tmp_path_factory):
    """An exported random Llama-style model with a tokenizer (vocab = the tokenizer's)."""
    from mlx_transformer.tokenizer import Tokenizer

    vocab = Tokenizer.load(tokenizer_path).vocab_size
    config = tiny_config(**CONFIGS["llama-gqa"], vocab_size=vocab, max_position_embeddings=128)
    model = random_model(config)
    ckpt = save_checkpoint(tmp_path_factory.mktemp("ckpt"), model, tokenizer_path=tokenizer_path)
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(ckpt, out, flavour="ort")
    return model, ckpt, out


# -- samplers (numpy) agree with the MLX ones ------------------------------------------------------


def test_filters_match_mlx_sampler_functions():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4, 50)).astype(np.float32)
    history = np.array([[1, 2, 3, -1], [4, 4, 5, 6], [-1, -1, 7, 8], [0, 49, 49, 1]])
    pairs = [
        (lambda x: sampling.apply_top_k(x, 5), lambda x: mlx_sample.apply_top_k(x, 5)),
        (lambda x: sampling.apply_top_p(x, 0.7), lambda x: mlx_sample.apply_top_p(x, 0.7)),
        (lambda x: sampling.apply_min_p(x, 0.1), lambda x: mlx_sample.apply_min_p(x, 0.1)),
        (
            lambda x: sampling.apply_repetition_penalty(x, history, 1.5),
            lambda x: mlx_sample.apply_repetition_penalty(x, mx.array(history), 1.5),
        ),
    ]
    for ours, theirs in pairs:
        np.testing.assert_allclose(ours(logits), np.array(theirs(mx.array(logits))), rtol=1e-6)


def test_sampler_seed_greedy_and_filters():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    assert (sampling.make_sampler()(logits) == 0).all()
    a = sampling.make_sampler(temp=1.0, seed=3)(logits)
    assert np.array_equal(a, sampling.make_sampler(temp=1.0, seed=3)(logits))
    np.testing.assert_allclose(
        np.bincount(a, minlength=4) / 2000, [0.5, 0.3, 0.15, 0.05], atol=0.04
    )
    assert set(sampling.make_sampler(temp=1.0, top_k=2, seed=0)(logits)) == {0, 1}
    assert set(sampling.make_sampler(temp=1.0, top_p=0.75, seed=0)(logits)) == {0, 1}
    assert set(sampling.make_sampler(temp=1.0, min_p=0.5, seed=0)(logits)) == {0, 1}
    with pytest.raises(ValueError, match="top-p"):
        sampling.make_sampler(temp=1.0, top_p=2.0)


def test_left_pad_matches_the_mlx_one():
    from mlx_transformer.generate.decode import left_pad as mlx_left_pad

    prompts = [[5, 6, 7], [8], [9, 10]]
    ids, mask = left_pad(prompts, pad_id=3)
    mlx_ids, mlx_mask = mlx_left_pad(prompts, pad_id=3)
    assert ids.dtype == mask.dtype == np.int64
    assert (
        ids.tolist() == np.array(mlx_ids).tolist() and mask.tolist() == np.array(mlx_mask).tolist()
    )
    assert left_pad([[1, 2]])[1].tolist() == [[1, 1]]  # a mask even when nothing is padded
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []])


# -- generation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["portable", "ort"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generation_is_token_exact_with_mlx(name, flavour, tmp_path):
    model = random_model(tiny_config(**CONFIGS[name], max_position_embeddings=80))
    ckpt = save_checkpoint(tmp_path / "ckpt", model)
    export_onnx(ckpt, tmp_path / "onnx", flavour=flavour)
    prompt = [3, 14, 15, 9, 26, 5]
    want = mlx_greedy(model, prompt, 64)
    got = OnnxGenerator(tmp_path / "onnx").generate_tokens([prompt], max_tokens=64)[0]
    assert got.tokens == want and got.finish_reason == "length"


def test_batched_left_padding_gives_each_prompt_its_own_tokens(text_model):
    _, _, out = text_model
    gen = OnnxGenerator(out)
    prompts = ["def forward(self", "x", "class Attention(nn.Module):\n    "]
    batch = gen.generate(prompts, max_tokens=20)
    for prompt, result in zip(prompts, batch):
        alone = gen.generate(prompt, max_tokens=20)[0]
        assert result.tokens == alone.tokens and result.text == alone.text


def test_shared_past_present_buffers_give_the_same_logits(text_model, monkeypatch):
    """The ort graph appending to one preallocated buffer per tensor (past_present_share_buffer)
    computes what it computes from a past it copies: left padding, batched decode, and buffers
    that grow twice on the way."""
    from export.session import OnnxModel, SharedKV

    monkeypatch.setattr(SharedKV, "STEP", 8)
    _, _, out = text_model
    shared, copied = OnnxModel(out, share_buffer=True), OnnxModel(out)
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12]])
    a, past_a = shared(ids, mask)
    b, past_b = copied(ids, mask)
    np.testing.assert_array_equal(a, b)
    assert isinstance(past_a, SharedKV) and isinstance(past_b, list)
    for _ in range(12):
        token = a[:, -1:].argmax(-1)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        a, past_a = shared(token, mask, past_a)
        b, past_b = copied(token, mask, past_b)
        np.testing.assert_array_equal(a, b)
    assert past_a.length == 18 and past_a.buffers[0].shape()[2] == 24
    assert OnnxGenerator(out).model.share_buffer  # what generation uses


@pytest.mark.parametrize("flavour", ["portable", "ort"])
def test_logits_to_keep_gives_the_last_positions_of_the_full_logits(flavour, tmp_path):
    """num_logits_to_keep (the LM head only at the last n positions) against the full logits of
    the same graph: prompts with and without shared buffers, a multi-token chunk after a past
    (cut into single tokens for batched GroupQueryAttention), the decode that follows, and a
    graph without the input (the runtime slices)."""
    import onnx

    from export.contract import LOGITS_TO_KEEP
    from export.session import OnnxModel

    model = random_model(tiny_config(**CONFIGS["llama-gqa"], max_position_embeddings=64))
    export_onnx(save_checkpoint(tmp_path / "ckpt", model), tmp_path / "onnx", flavour=flavour)
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]])
    full, _ = OnnxModel(tmp_path / "onnx")(ids, mask)
    for share_buffer in (False, True):
        onnx_model = OnnxModel(tmp_path / "onnx", share_buffer=share_buffer)
        assert onnx_model.keeps_logits
        for n in (1, 3, 7, 9):
            kept, past = onnx_model(ids, mask, logits_to_keep=n)
            assert kept.shape == (2, min(n, 7), full.shape[2])
            np.testing.assert_allclose(kept, full[:, -min(n, 7) :], atol=1e-5, rtol=0)
        # the past that a kept prompt leaves behind continues as the full one's does
        _, full_past = onnx_model(ids, mask)
        more = np.array([[15, 16, 17], [18, 19, 20]])
        mask3 = np.concatenate([mask, np.ones((2, 3), np.int64)], axis=1)
        want, _ = onnx_model(more, mask3, full_past)
        got, past = onnx_model(more, mask3, past, logits_to_keep=2)
        np.testing.assert_allclose(got, want[:, -2:], atol=1e-5, rtol=0)
        step, _ = onnx_model(got[:, -1:].argmax(-1), np.concatenate([mask3, mask3[:, :1]], 1), past)
        want_step, _ = OnnxModel(tmp_path / "onnx")(
            np.concatenate([ids, more, got[:, -1:].argmax(-1)], 1),
            np.concatenate([mask3, mask3[:, :1]], 1),
        )
        np.testing.assert_allclose(step[:, -1], want_step[:, -1], atol=1e-5, rtol=0)
    # Without the graph input (an initializer only) every position is computed; same answers.
    proto = onnx.load(tmp_path / "onnx" / "onnx/model.onnx")
    kept_inputs = [i for i in proto.graph.input if i.name != LOGITS_TO_KEEP]
    del proto.graph.input[:]
    proto.graph.input.extend(kept_inputs)
    onnx.save(proto, tmp_path / "onnx" / "onnx/model.onnx")
    old = OnnxModel(tmp_path / "onnx")
    assert not old.keeps_logits
    np.testing.assert_allclose(old(ids, mask, logits_to_keep=3)[0], full[:, -3:], atol=1e-5)


def test_sampling_is_reproducible_with_a_seed(text_model):
    gen = OnnxGenerator(text_model[2])
    settings = dict(max_tokens=30, temp=0.9, top_p=0.9, top_k=40, min_p=0.02, seed=7)
    a = gen.generate("import ", **settings)[0]
    assert a.tokens == gen.generate("import ", **settings)[0].tokens
    # EOS off: the tokenizer is trained on model.py's text, so what is sampled changes with it.
    penalised = {**settings, "repetition_penalty": 1.3, "stop_at_eos": False}
    b = gen.generate("import ", **penalised)[0]
    assert len(b.tokens) == 30 and b.finish_reason == "length"
    assert b.tokens == gen.generate("import ", **penalised)[0].tokens


def test_stop_strings_eos_and_streaming(text_model):
    gen = OnnxGenerator(text_model[2])
    full = gen.generate("def ", max_tokens=40)[0]
    assert full.finish_reason == "length" and len(full.tokens) == 40
    stop = full.text[10:13]
    cut = gen.generate("def ", max_tokens=40, stop=[stop])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    assert "".join(gen.stream("def ", max_tokens=40, stop=[stop])) == cut.text
    assert "".join(gen.stream("def ", max_tokens=40)) == full.text
    # Pretend the first token not generated before is EOS: generation stops just before it.
    k = next(i for i, t in enumerate(full.tokens) if i > 0 and t not in full.tokens[:i])
    gen.eos_ids = {full.tokens[k]}
    eos = gen.generate("def ", max_tokens=40)[0]
    assert eos.finish_reason == "eos" and eos.tokens == full.tokens[:k]


def test_context_overflow_errors_or_slides_like_mlx(text_model):
    from mlx_transformer.errors import UserError
    from mlx_transformer.generate.api import generate_step

    model, _, out = text_model
    gen = OnnxGenerator(out)
    prompt = list(range(5, 125))  # 120 tokens; the context is 128
    with pytest.raises(UserError, match="exceeds the model's context of 128"):
        gen.generate_tokens([prompt], max_tokens=50)
    assert len(gen.generate_tokens([prompt], max_tokens=8, stop_at_eos=False)[0].tokens) == 8
    # Sliding re-prefills the last half of the context: the same windows as MLX, so the same
    # greedy tokens, across two slides.
    got = gen.generate_tokens([prompt], max_tokens=150, overflow="slide", stop_at_eos=False)[0]
    want = list(generate_step(prompt, model, max_tokens=150, overflow="slide"))
    assert got.tokens == want and got.finish_reason == "length"


def test_cli_export_and_onnx_generate(text_model, tmp_path, capsys):
    _, ckpt, _ = text_model
    out = tmp_path / "cli"
    assert main(["export", str(ckpt), str(out), "--flavour", "portable"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["onnx-generate", str(out), "--prompt", "def ", "--max-tokens", "10"]) == 0
    expected = OnnxGenerator(out).generate("def ", max_tokens=10)[0].text
    assert capsys.readouterr().out == f"def {expected}\n"
    assert main(["onnx-generate", str(out), "--prompt", "x", "--top-p", "3", "--temp", "1"]) == 2


NO_MLX = BLOCK_MLX + textwrap.dedent(
    """
    from export import export_onnx
    from export.runtime import OnnxGenerator

    export_onnx(sys.argv[1], sys.argv[2], flavour="ort", precision="int8")
    result = OnnxGenerator(sys.argv[2]).generate("def ", max_tokens=8, temp=0.7, seed=1)[0]
    assert len(result.tokens) == 8, result
    assert not any(m == "mlx" or m.startswith("mlx.") for m in sys.modules)
    print("ok", repr(result.text))
    """
)


def test_export_and_runtime_work_without_mlx(text_model, tmp_path):
    _, ckpt, _ = text_model
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", NO_MLX, str(ckpt), str(tmp_path / "onnx")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok")


def test_empty_and_whitespace_prompts_match_mlx(text_model):
    """An empty prompt starts from EOS (the document separator) on both sides."""
    from mlx_transformer.generate.api import generate as mlx_generate
    from mlx_transformer.tokenizer import Tokenizer

    model, ckpt, out = text_model
    tokenizer = Tokenizer.load(ckpt)
    runner = OnnxGenerator(out)
    for prompt in ("", "   "):
        want = mlx_generate(model, tokenizer, prompt, max_tokens=12)
        got = runner.generate(prompt, max_tokens=12)[0]
        assert got.text == want, repr(prompt)


def test_requests_that_cannot_run_are_refused_before_any_work(text_model):
    """The generator API checks eagerly, as the command line does: no partial output first."""
    from mlx_transformer.errors import UserError

    _, _, out = text_model
    gen = OnnxGenerator(out)
    vocab = gen.model.io["vocab_size"]
    for prompts, max_tokens, message in [
        ([[5, 6]], -1, "--max-tokens must be a non-negative integer"),
        ([[5, vocab]], 2, f"outside the model's vocabulary 0..{vocab - 1}"),
        ([[5] * 120], 20, "exceeds the model's context of 128 tokens"),
    ]:
        with pytest.raises(UserError, match=message):
            gen.check_request(prompts, max_tokens)
        with pytest.raises(UserError, match=message):
            gen.generate_tokens(prompts, max_tokens)
    assert "".join(gen.stream([5, 6], 4)) == gen.generate_tokens([[5, 6]], 4)[0].text
