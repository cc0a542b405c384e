"""Generation with sliding-window models: the ring-buffer decoder against the rolling cache and the
full forward pass with the windowed mask, past the context, in constant memory."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from helpers import LLAMA
from test_model import random_model, tiny_config

from mlx_transformer.config import ModelConfig
from mlx_transformer.generate.api import (
    ContextOverflowError,
    batch_generate_step,
    generate_step,
)
from mlx_transformer.generate.decode import DynamicCacheDecoder, left_pad, prefill
from mlx_transformer.generate.rolling import RingCacheDecoder
from mlx_transformer.model import Transformer

ROPE = LLAMA  # the windowed tests run on rotary models
PROMPTS = [[5, 9, 2, 7, 7, 1, 30, 4, 11], [3], [8, 8, 12, 40, 2]]


def with_context(model: Transformer, context: int) -> Transformer:
    """The same weights with a longer context: the reference for text past the model's own."""
    twin = Transformer(
        ModelConfig(**{**model.config.to_dict(), "max_position_embeddings": context})
    )
    twin.update(model.parameters())
    twin.eval()
    return twin


@pytest.mark.parametrize("sinks", [0, 2])
def test_ring_decoder_equals_rolling_cache_and_windowed_forward_past_the_context(sinks):
    """Left-padded batch, decode 8x the window past a context of 48: each step's logits equal the
    eager rolling cache's and the full forward pass's (windowed mask, no cache) at that position."""
    model = random_model(tiny_config(**ROPE, sliding_window=5, attention_sinks=sinks), seed=2)
    ids, mask = left_pad(PROMPTS)
    B, L = ids.shape
    prefix = mask[:, :-1]
    ring = RingCacheDecoder(model, prefill(model, ids[:, :-1], prefix, 4, rolling=True))
    dynamic = DynamicCacheDecoder(model, prefill(model, ids[:, :-1], prefix, 4, rolling=True), None)
    steps, y, fed, got = 8 * 5, ids[:, -1], [ids], []
    for _ in range(steps):
        a, b = ring(y), dynamic(y)
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)
        got.append(np.array(a))
        y = mx.argmax(a, axis=-1).astype(mx.int32)
        fed.append(y[:, None])
    assert ring.cache_slots == 5 + sinks  # constant: the buffers never grew
    assert all(c.size <= 4 + sinks for c in dynamic.cache)
    text = mx.concatenate(fed[:-1], axis=1)  # (B, L + steps - 1) > 48
    full_mask = mx.concatenate([mask, mx.ones((B, steps - 1), mask.dtype)], axis=1)
    full = np.array(with_context(model, text.shape[1])(text, attention_mask=full_mask))
    np.testing.assert_allclose(np.stack(got, axis=1), full[:, L - 1 :], atol=1e-4)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_greedy_past_the_context_batched_equals_alone_and_full_forward(compiled):
    model = random_model(tiny_config(**ROPE, sliding_window=6, attention_sinks=1), seed=4)
    n = 50  # prompt + 50 > 48: no overflow for a rolling model
    batch = list(batch_generate_step(PROMPTS, model, max_tokens=n, compiled=compiled))
    twin = with_context(model, 80)
    for b, prompt in enumerate(PROMPTS):
        alone = list(generate_step(prompt, model, max_tokens=n, compiled=compiled))
        assert [step[b] for step in batch] == alone
        ids = list(prompt)
        for _ in range(n):  # the reference: argmax of a full forward pass, no cache
            ids.append(int(mx.argmax(twin(mx.array([ids]))[0, -1]).item()))
        assert alone == ids[len(prompt) :]


def test_learned_positions_keep_the_context_limit():
    """Within the context a learned-position model rolls too (bounded cache); past it, the one
    thing there is for a table of positions: refuse, or re-prefill with --overflow slide."""
    model = random_model(tiny_config(sliding_window=6), seed=4)
    for compiled in (True, False):
        got = list(generate_step([1, 2, 3], model, max_tokens=40, compiled=compiled))
        ids = [1, 2, 3]
        for _ in range(40):
            ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
        assert got == ids[3:]
    with pytest.raises(ContextOverflowError, match="exceeds the model's context of 48"):
        batch_generate_step([[1, 2, 3]], model, max_tokens=46)
    got = list(generate_step([1, 2, 3], model, max_tokens=60, overflow="slide"))
    assert len(got) == 60


def test_mixed_layers_generate_within_the_context_like_the_full_forward():
    """Full-attention layers keep a growing cache: the static decoder with the windowed mask."""
    types = ["sliding_attention", "full_attention"]
    model = random_model(tiny_config(**ROPE, sliding_window=4, layer_types=types), seed=5)
    for compiled in (True, False):
        got = list(generate_step(PROMPTS[0], model, max_tokens=20, compiled=compiled))
        ids = list(PROMPTS[0])
        for _ in range(20):
            ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
        assert got == ids[len(PROMPTS[0]) :]


@pytest.mark.slow  # prepare, train and generate: ~20 s on a loaded 2-core machine
def test_train_then_generate_past_the_context_from_the_command_line(
    tmp_path, tiny_corpus_text, tiny_tokenizer_path, capsys
):
    """`train --sliding-window 4 --attention-sinks 1` (rotary, context 16) writes a checkpoint
    whose config keeps the window; `generate --max-tokens 40` then runs past the context (no
    --overflow needed) and prints what the API generates."""
    from mlx_transformer.checkpoint.mlx_io import load_checkpoint
    from mlx_transformer.cli import main
    from mlx_transformer.data.prepare import prepare
    from mlx_transformer.generate.api import generate
    from mlx_transformer.tokenizer import Tokenizer

    (tmp_path / "corpus.txt").write_text(tiny_corpus_text[:20_000])
    prepare([tmp_path / "corpus.txt"], tmp_path / "ds", tokenizer=tiny_tokenizer_path)
    flags = "--hidden-size 32 --num-hidden-layers 2 --num-attention-heads 4 "
    flags += "--max-position-embeddings 16 --position-encoding rope --norm-type rmsnorm "
    flags += "--hidden-act swiglu --sliding-window 4 --attention-sinks 1 --batch-size 4 "
    flags += "--max-steps 3 --warmup-steps 1 --eval-every 0 --save-every 3 --no-progress"
    args = ["train", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "run")]
    assert main(args + flags.split()) == 0
    ckpt = tmp_path / "run" / "latest"
    model = load_checkpoint(ckpt)
    assert (model.config.sliding_window, model.config.attention_sinks) == (4, 1)
    capsys.readouterr()
    rc = main(["generate", "--model", str(ckpt), "--prompt", "The king", "--max-tokens", "40"])
    out = capsys.readouterr().out
    tokenizer = Tokenizer.load(ckpt)
    assert rc == 0 and out == generate(model, tokenizer, "The king", max_tokens=40) + "\n"
