"""The model against a float64 numpy reference, and its masks, positions and KV cache."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from helpers import LLAMA, assert_training_matches_reference
from mlx.utils import tree_flatten, tree_unflatten

import reference
from mlx_transformer import ops
from mlx_transformer.config import ModelConfig
from mlx_transformer.model import Transformer, apply_rope, make_cache, sinusoidal_encoding

# Every architecture switch appears in at least one configuration.
CONFIGS = {
    "gpt2": dict(hidden_act="gelu_tanh"),
    "paper": dict(
        position_encoding="sinusoidal",
        norm_position="post",
        hidden_act="relu",
        scale_embeddings=True,
    ),
    "llama-gqa": LLAMA,
    "rope-traditional-mqa": dict(
        position_encoding="rope",
        rope_traditional=True,
        rope_theta=500.0,
        num_key_value_heads=1,
        hidden_act="gelu",
    ),
    "nopos-rms-post": dict(
        position_encoding="none",
        norm_type="rmsnorm",
        norm_position="post",
        attention_bias=False,
    ),
}


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=61,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=48,
    )
    return ModelConfig(**{**base, **overrides})


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """A model with O(1) random weights, so that errors are not hidden by tiny activations."""
    model = Transformer(config)
    rng = np.random.default_rng(seed)
    params = []
    for name, p in tree_flatten(model.parameters()):
        scale = 1 / np.sqrt(p.shape[-1]) if p.ndim == 2 else 0.3
        value = rng.normal(0, scale, p.shape) + (1.0 if name.endswith("norm.weight") else 0.0)
        if name.startswith("embed"):
            value = rng.normal(0, 0.3, p.shape)
        params.append((name, mx.array(value.astype(np.float32))))
    model.update(tree_unflatten(params))
    model.eval()
    mx.eval(model.parameters())
    return model


def params_np(model: Transformer) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def model(request) -> Transformer:
    return random_model(tiny_config(**CONFIGS[request.param]))


# Both ways `ops` can run the model on this backend: with the CPU kernels (cpu.fastmath) and with
# MLX's own kernels only. Each must compute the reference's function.
KERNELS = pytest.mark.parametrize("cpu_kernels", [True, False], ids=["cpu-kernels", "mlx-kernels"])


@KERNELS
def test_matches_float64_reference(model, cpu_kernels):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, model.config.vocab_size, (2, 23))
    expected, expected_w = reference.forward(model.config, params_np(model), ids)
    with ops.use_cpu_kernels(cpu_kernels):
        logits = model(mx.array(ids))
        out = model.forward(mx.array(ids), output_attentions=True)
    np.testing.assert_allclose(np.array(logits), expected, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.array(out.logits), expected, atol=2e-4, rtol=1e-4)
    for got, want in zip(out.attentions, expected_w):
        np.testing.assert_allclose(np.array(got), want, atol=1e-5)


@KERNELS
def test_padded_batch_matches_reference(model, cpu_kernels):
    rng = np.random.default_rng(2)
    ids = rng.integers(0, model.config.vocab_size, (3, 17))
    mask = np.ones((3, 17), np.int64)
    mask[0, :5] = 0  # left padding
    mask[1, 12:] = 0  # right padding
    expected, _ = reference.forward(model.config, params_np(model), ids, mask)
    with ops.use_cpu_kernels(cpu_kernels):
        got = np.array(model(mx.array(ids), attention_mask=mx.array(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], expected[real], atol=2e-4, rtol=1e-4)


@KERNELS
def test_training_mode_matches_reference_and_eval_gradients(model, cpu_kernels):
    """Training with the CPU kernels takes fastmath's attention, GELU/SiLU and linear layers (with
    hand-written backward passes): same function as the reference, same gradients as autodiff
    through MLX's own kernels in inference mode."""
    rng = np.random.default_rng(5)
    ids = rng.integers(0, model.config.vocab_size, (3, 17))
    mask = np.ones((3, 17), np.int64)
    mask[0, :5] = 0  # left padding
    mask[1, 12:] = 0  # right padding
    expected, _ = reference.forward(model.config, params_np(model), ids, mask)
    assert_training_matches_reference(model, ids, mask, expected, rng, cpu_kernels)


def test_causality(model):
    rng = np.random.default_rng(3)
    ids = rng.integers(0, model.config.vocab_size, (1, 20))
    changed = ids.copy()
    changed[0, 11:] = (changed[0, 11:] + 7) % model.config.vocab_size
    a, b = np.array(model(mx.array(ids))), np.array(model(mx.array(changed)))
    assert np.array_equal(a[:, :11], b[:, :11])
    assert not np.allclose(a[:, 11:], b[:, 11:])


def test_left_and_right_padding_equal_sequences_alone(model):
    rng = np.random.default_rng(4)
    lengths = [9, 16, 4]
    seqs = [rng.integers(0, model.config.vocab_size, n) for n in lengths]
    alone = [np.array(model(mx.array(s[None])))[0] for s in seqs]
    T = max(lengths)
    for side in ("left", "right"):
        ids = np.zeros((len(seqs), T), np.int64)
        mask = np.zeros((len(seqs), T), np.int64)
        for i, s in enumerate(seqs):
            sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            ids[i, sl], mask[i, sl] = s, 1
        out = np.array(model(mx.array(ids), attention_mask=mx.array(mask)))
        for i, s in enumerate(seqs):
            sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            assert np.abs(out[i, sl] - alone[i]).max() <= 1e-5, side


def test_kv_cache_prefill_then_decode_equals_full_forward(model):
    rng = np.random.default_rng(5)
    ids = mx.array(rng.integers(0, model.config.vocab_size, (2, 21)))
    full = np.array(model(ids))
    cache = make_cache(model)
    pieces = [model(ids[:, :9], cache=cache)]  # prefill
    pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(9, 21)]  # decode
    assert np.abs(np.array(mx.concatenate(pieces, axis=1)) - full).max() <= 1e-5


def test_kv_cache_with_left_padded_batch(model):
    """Batched generation: left-padded prefill, then one token at a time with a growing mask."""
    rng = np.random.default_rng(6)
    lengths, steps = [5, 11], 6
    seqs = [rng.integers(0, model.config.vocab_size, n + steps) for n in lengths]
    T = max(lengths)
    ids = np.zeros((2, T), np.int64)
    mask = np.zeros((2, T), np.int64)
    for i, n in enumerate(lengths):
        ids[i, T - n :], mask[i, T - n :] = seqs[i][:n], 1
    cache = make_cache(model)
    last = [np.array(model(mx.array(ids), attention_mask=mx.array(mask), cache=cache))[:, -1]]
    for t in range(steps):
        step_ids = np.array([[s[n + t]] for s, n in zip(seqs, lengths)])
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        out = model(mx.array(step_ids), attention_mask=mx.array(mask), cache=cache)
        last.append(np.array(out)[:, -1])
    for i, n in enumerate(lengths):
        alone = np.array(model(mx.array(seqs[i][None])))[0]
        got = np.stack([step[i] for step in last])
        assert np.abs(got - alone[n - 1 :]).max() <= 1e-5


def test_context_limit_is_an_error():
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match="exceeds the model's context of 48"):
        model(mx.zeros((1, 49), mx.int32))


def test_sinusoidal_encoding_is_the_papers_formula():
    positions = np.arange(50)[None]
    got = np.array(sinusoidal_encoding(mx.array(positions), 64))
    np.testing.assert_allclose(got, reference.sinusoidal(positions, 64), atol=2e-5)


@pytest.mark.parametrize("traditional", [False, True])
def test_rope_is_a_rotation_of_feature_pairs(traditional):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 3, 10, 16)).astype(np.float32)
    offsets = np.array([0, 37])
    got = np.array(apply_rope(mx.array(x), mx.array(offsets), 16, 10000.0, traditional))
    positions = offsets[:, None] + np.arange(10)[None]
    want = reference.rotate(x.astype(np.float64), positions, 10000.0, traditional)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_attention_weights_are_causal_distributions():
    model = random_model(tiny_config(**CONFIGS["llama-gqa"]))
    mask = mx.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out = model.forward(mx.array([[1, 2, 3, 4, 5, 6]] * 2), mask, output_attentions=True)
    for w in out.attentions:
        w = np.array(w)
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
        assert np.all(np.triu(w, k=1) == 0)
        assert np.all(w[0, :, 2:, :2] == 0)  # real tokens never attend to padding


def test_hidden_states_and_fused_path_agree(model):
    ids = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    out = model.forward(ids, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    np.testing.assert_allclose(np.array(out.logits), np.array(model(ids)), atol=1e-5)
    last = model.logits_from_hidden(out.hidden_states[-1])
    np.testing.assert_array_equal(np.array(last), np.array(out.logits))


def test_config_defaults_and_validation():
    c = ModelConfig(hidden_size=96, num_attention_heads=3, hidden_act="swiglu")
    assert c.head_dim == 32 and c.num_key_value_heads == 3 and c.intermediate_size == 256
    assert ModelConfig.from_dict({**c.to_dict(), "model_type": "x", "unknown": 1}) == c
    bad = [
        ({"num_key_value_heads": 3}, "num_attention_heads \\(4\\) must be a multiple"),
        ({"position_encoding": "alibi"}, "position_encoding must be one of"),
        ({"hidden_size": -1}, "hidden_size must be a positive integer"),
        ({"attention_dropout": 1.5}, "attention_dropout must be a number in"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
        ({"norm_eps": 0}, "norm_eps must be a positive finite number"),
        ({"extra": "x"}, "extra must be a JSON object"),
    ]
    from mlx_transformer.config import ConfigError

    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message):
            ModelConfig(**overrides)


@pytest.mark.parametrize(
    "field",
    [
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "head_dim",
        "intermediate_size",
        "max_position_embeddings",
    ],
)
def test_config_sizes_have_upper_bounds_naming_the_field(field):
    """A few bytes of config.json must not describe a model too large to even list."""
    from mlx_transformer.config import MAX_SIZES, ConfigError

    most = MAX_SIZES[field]
    extra = {"num_key_value_heads": most} if field == "num_attention_heads" else {}
    if field in ("hidden_size", "num_attention_heads"):
        extra["head_dim"] = 8  # no derived head_dim to trip over first
    with pytest.raises(ConfigError, match=f"{field} must be at most {most:,}, got {most + 1:,}"):
        ModelConfig(**{field: most + 1, **extra})
    with pytest.raises(ConfigError, match=f"{field} must be at most"):
        ModelConfig.from_dict({field: 10**400, **extra})  # no float overflow on the way


@pytest.mark.parametrize(
    "field",
    [
        "rope_theta",
        "norm_eps",
        "initializer_range",
        "embedding_dropout",
        "attention_dropout",
        "residual_dropout",
    ],
)
@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
def test_every_float_field_refuses_nan_and_infinity(field, value):
    from mlx_transformer.config import ConfigError

    with pytest.raises(ConfigError, match=f"{field} must be a"):
        ModelConfig(**{field: value})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tensor_and_parameter_counts_match_the_listing(name):
    config = tiny_config(**CONFIGS[name], num_hidden_layers=3)
    shapes = config.parameter_shapes()
    assert list(shapes.items()) == list(config.iter_parameter_shapes())
    assert config.num_tensors() == len(shapes)
    assert config.num_parameters() == sum(int(np.prod(s)) for s in shapes.values())
    huge = tiny_config(**CONFIGS[name], num_hidden_layers=16_384)
    assert huge.num_tensors() == len(huge.parameter_shapes())


def test_parameter_names_are_the_file_format(model):
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    assert shapes == model.config.parameter_shapes()


def test_training_mode_dropout_uses_explicit_attention():
    config = tiny_config(attention_dropout=0.5, residual_dropout=0.1, embedding_dropout=0.1)
    model = random_model(config)
    ids = mx.array([[1, 2, 3, 4, 5]])
    model.train()
    a, b = np.array(model(ids)), np.array(model(ids))
    assert not np.allclose(a, b)  # dropout is active
    model.eval()
    np.testing.assert_array_equal(np.array(model(ids)), np.array(model(ids)))
