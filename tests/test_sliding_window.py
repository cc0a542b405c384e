"""Sliding-window attention with attention sinks: the mask against the float64 reference, and the
rolling KV cache against the full forward pass."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from helpers import assert_training_matches_reference
from test_model import params_np, random_model, tiny_config

import reference
from mlx_transformer import ops
from mlx_transformer.config import ConfigError, ModelConfig
from mlx_transformer.model import make_cache

POSITIONS = {
    "learned": dict(position_encoding="learned"),
    "sinusoidal": dict(position_encoding="sinusoidal", norm_position="post", hidden_act="relu"),
    "rope": dict(
        position_encoding="rope",
        norm_type="rmsnorm",
        hidden_act="swiglu",
        num_key_value_heads=2,
        attention_bias=False,
    ),
}
WINDOWS = {
    "window": dict(sliding_window=5),
    "window+sinks": dict(sliding_window=4, attention_sinks=2),
    "mixed-layers": dict(
        sliding_window=3,
        num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
}


def padded(rng, vocab: int, lengths: list[int], side: str) -> tuple[np.ndarray, np.ndarray]:
    T = max(lengths)
    ids = rng.integers(0, vocab, (len(lengths), T))
    mask = np.zeros((len(lengths), T), np.int64)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, T - n :] = 1
        else:
            mask[i, :n] = 1
    return ids, mask


@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize("pe", list(POSITIONS))
@pytest.mark.parametrize("side", ["none", "left", "right"])
def test_windowed_attention_matches_float64_reference(pe, window, side):
    model = random_model(tiny_config(**POSITIONS[pe], **WINDOWS[window]))
    rng = np.random.default_rng(1)
    lengths = [19, 19] if side == "none" else [19, 11, 6]
    ids, mask = padded(rng, model.config.vocab_size, lengths, "left" if side == "none" else side)
    expected, expected_w = reference.forward(model.config, params_np(model), ids, mask)
    real = mask.astype(bool)
    am = None if side == "none" else mx.array(mask)
    for cpu_kernels in (True, False):
        with ops.use_cpu_kernels(cpu_kernels):
            got = np.array(model(mx.array(ids), attention_mask=am))
        np.testing.assert_allclose(got[real], expected[real], atol=2e-4, rtol=1e-4)
    out = model.forward(mx.array(ids), am, output_attentions=True)
    for got, want in zip(out.attentions, expected_w):  # the window itself, not just the logits
        got, want = np.array(got), want
        for b in range(len(lengths)):
            rows = real[b]
            np.testing.assert_allclose(got[b][:, rows], want[b][:, rows], atol=1e-5)


def test_window_changes_the_function_and_a_wide_window_does_not():
    base = tiny_config(**POSITIONS["rope"])
    ids = mx.array(np.random.default_rng(2).integers(0, 61, (1, 20)))
    full = np.array(random_model(base)(ids))
    wide = np.array(random_model(tiny_config(**POSITIONS["rope"], sliding_window=20))(ids))
    narrow = np.array(random_model(tiny_config(**POSITIONS["rope"], sliding_window=4))(ids))
    np.testing.assert_allclose(wide, full, atol=1e-5)  # a mask instead of the causal kernel
    np.testing.assert_allclose(narrow[:, :4], full[:, :4], atol=1e-5)
    assert np.abs(narrow[:, 4:] - full[:, 4:]).max() > 1e-2


@pytest.mark.parametrize("pe", list(POSITIONS))
def test_training_with_a_window_matches_reference_and_gradients(pe):
    """Training mode (the CPU kernels' attention with the windowed mask) computes the reference's
    function, and its gradients equal autodiff through MLX's own kernels."""
    model = random_model(tiny_config(**POSITIONS[pe], **WINDOWS["window+sinks"]))
    rng = np.random.default_rng(5)
    ids, mask = padded(rng, model.config.vocab_size, [17, 9], "right")
    expected, _ = reference.forward(model.config, params_np(model), ids, mask)
    assert_training_matches_reference(model, ids, mask, expected, rng)


# -- the rolling cache ---------------------------------------------------------------------------


def decode(model, ids: np.ndarray, mask: np.ndarray | None, prompt: int, rolling: bool, chunk=4):
    """Prefill ids[:, :prompt] in chunks, then feed the rest one token at a time; all logits."""
    cache = make_cache(model, rolling=rolling)
    out = []
    for start in range(0, prompt, chunk):
        end = min(start + chunk, prompt)
        am = mx.array(mask[:, :end]) if mask is not None else None
        out.append(model(mx.array(ids[:, start:end]), attention_mask=am, cache=cache))
    for t in range(prompt, ids.shape[1]):
        # A rolling cache knows each row's padding and positions; a growing one needs the mask.
        am = mx.array(mask[:, : t + 1]) if mask is not None and not rolling else None
        out.append(model(mx.array(ids[:, t : t + 1]), attention_mask=am, cache=cache))
    return np.array(mx.concatenate(out, axis=1)), cache


@pytest.mark.parametrize("window", ["window", "window+sinks"])
@pytest.mark.parametrize("pe", list(POSITIONS))
def test_rolling_cache_decode_equals_windowed_forward_left_padded(pe, window):
    """Chunked prefill of a left-padded batch, then decode past the window several times over:
    every logit equals the full forward pass with the windowed mask."""
    model = random_model(tiny_config(**POSITIONS[pe], **WINDOWS[window]))
    rng = np.random.default_rng(3)
    ids, mask = padded(rng, model.config.vocab_size, [40, 33], "left")  # 8x the window of 5
    full = np.array(model(mx.array(ids), attention_mask=mx.array(mask)))
    got, cache = decode(model, ids, mask, prompt=10, rolling=True)
    real = mask.astype(bool)
    assert np.abs(got[real] - full[real]).max() <= 1e-5
    W, sinks = model.config.sliding_window, model.config.attention_sinks
    assert all(c.keys.shape[2] == W - 1 and c.size == W - 1 + sinks for c in cache)


def test_mixed_layers_roll_only_the_windowed_ones():
    model = random_model(tiny_config(**POSITIONS["rope"], **WINDOWS["mixed-layers"]))
    rng = np.random.default_rng(4)
    ids, mask = padded(rng, model.config.vocab_size, [30, 30], "left")
    full = np.array(model(mx.array(ids)))
    got, cache = decode(model, ids, None, prompt=7, rolling=True)
    assert np.abs(got - full).max() <= 1e-5
    assert [type(c).__name__ for c in cache] == ["RollingKVCache", "KVCache", "RollingKVCache"]


def test_rope_model_generates_past_its_context_in_constant_memory():
    """max_position_embeddings is 48: a rolling cache decodes 8x the window (and past 48) with a
    cache of window - 1 + sinks slots, each step equal to a fresh forward over what it sees."""
    config = tiny_config(**POSITIONS["rope"], sliding_window=8, attention_sinks=2)
    model = random_model(config)
    rng = np.random.default_rng(6)
    n = 8 * config.sliding_window + 3  # 67 > 48
    ids = rng.integers(0, config.vocab_size, (2, n))
    got, cache = decode(model, ids, None, prompt=5, rolling=True)
    sizes = {c.size for c in cache}
    assert sizes == {config.sliding_window - 1 + config.attention_sinks}
    # The float64 reference over the whole text (given a context that holds it).
    ref_cfg = ModelConfig(**{**config.to_dict(), "max_position_embeddings": n})
    expected, _ = reference.forward(ref_cfg, params_np(model), ids)
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)


def test_learned_positions_cannot_roll_past_their_table():
    model = random_model(tiny_config(**POSITIONS["learned"], sliding_window=4))
    cache = make_cache(model, rolling=True)
    model(mx.zeros((1, 48), mx.int32), cache=cache)
    with pytest.raises(ValueError, match="exceeds the model's context of 48"):
        model(mx.zeros((1, 1), mx.int32), cache=cache)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(sliding_window=0), "sliding_window must be a positive integer or null"),
        (dict(sliding_window=True), "sliding_window must be a positive integer"),
        (
            dict(sliding_window=4, layer_types=["sliding_attention"]),
            "layer_types must be a list of 2",
        ),
        (
            dict(sliding_window=4, layer_types=["local", "global"]),
            "layer_types entries must be one of",
        ),
        (dict(layer_types=["sliding_attention"] * 2), "set sliding_window"),
        (dict(sliding_window=4, attention_sinks=-1), "attention_sinks must be a non-negative"),
        (dict(attention_sinks=4), "attention_sinks needs sliding_window"),
    ],
)
def test_window_config_validation_names_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**overrides)


def test_window_config_round_trips_and_adds_no_weights(tmp_path):
    config = tiny_config(**WINDOWS["mixed-layers"], attention_sinks=1)
    config.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == config
    assert config.parameter_shapes() == tiny_config(num_hidden_layers=3).parameter_shapes()
    assert [config.layer_window(i) for i in range(3)] == [3, None, 3]


@pytest.mark.parametrize("sinks", [0, 3])
def test_blocked_attention_equals_the_dense_mask(sinks):
    """A whole sequence longer than 2W goes through query blocks of W (O(L·W)); the same
    attention as the dense L x L mask, padded rows and a length that is no multiple of W."""
    from mlx_transformer.local_attention import WindowMask, blocked_attention
    from mlx_transformer.model import key_positions

    rng = np.random.default_rng(7)
    B, H, K, L, hd, W = 3, 4, 2, 53, 8, 8
    q, k, v = (mx.array(rng.normal(size=(B, n, L, hd)).astype(np.float32)) for n in (H, K, K))
    mask = np.ones((B, L), np.int64)
    mask[1, :13] = 0  # left padding
    mask[2, 40:] = 0  # right padding
    keys = key_positions(mx.array(mask), L)
    window = WindowMask(keys, keys, W, sinks)
    assert window.blocks(L, L) and not window.blocks(2 * W, 2 * W)
    got = np.array(blocked_attention(q, k, v, hd**-0.5, window, training=False))
    want = np.array(ops.scaled_dot_product_attention(q, k, v, hd**-0.5, window.dense, False))
    real = mask.astype(bool)
    np.testing.assert_allclose(
        got.transpose(0, 2, 1, 3)[real], want.transpose(0, 2, 1, 3)[real], atol=1e-5
    )


@pytest.mark.parametrize("cache", ["rolling", "growing"])
def test_a_long_first_chunk_goes_through_blocks_with_a_cache(cache):
    """A first prefill chunk longer than 2W (blocked attention) into either cache, then decoding:
    equal to the full forward pass."""
    model = random_model(tiny_config(**POSITIONS["rope"], sliding_window=4))
    rng = np.random.default_rng(8)
    ids, mask = padded(rng, model.config.vocab_size, [30, 21], "left")
    full = np.array(model(mx.array(ids), attention_mask=mx.array(mask)))
    got, _ = decode(model, ids, mask, prompt=17, rolling=cache == "rolling", chunk=17)
    real = mask.astype(bool)
    assert np.abs(got[real] - full[real]).max() <= 1e-5
