"""fastmath's polynomial exp / tanh / GELU against float64 numpy, and its attention's causality."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_transformer.cpu import fastmath


def test_exp_matches_float64():
    x = mx.linspace(-87.3, 87.0, 200_001)
    want = np.exp(np.array(x, dtype=np.float64))
    rel = np.abs(np.array(fastmath.exp(x)) / want - 1)
    assert rel.max() < 1e-5  # the float32 argument's own rounding, times |x|
    small = np.abs(np.array(x)) < 10
    assert rel[small].max() < 1e-6
    # Far below the float32 range: exactly 0 (softmax's masked keys rely on it).
    assert np.array(fastmath.exp(mx.array([-88.0, -1e4, -1e30]))).tolist() == [0.0, 0.0, 0.0]


def test_tanh_and_gelu_match_float64():
    x = mx.linspace(-20, 20, 200_001)
    x64 = np.array(x, dtype=np.float64)
    assert np.abs(np.array(fastmath.tanh(x)) - np.tanh(x64)).max() < 1e-6
    gelu = 0.5 * x64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64**3)))
    np.testing.assert_allclose(np.array(fastmath.gelu_tanh(x)), gelu, rtol=1e-6, atol=1e-6)
    # The split-up GELU rounds exactly as composing fastmath.tanh does (saturating to +-1).
    c = float(np.sqrt(2 / np.pi))
    composed = 0.5 * x * (1.0 + fastmath.tanh(c * x * (1.0 + 0.044715 * (x * x))))
    assert mx.array_equal(fastmath.gelu_tanh(x), composed).item()
    huge = mx.array([1e20, -1e20, float("inf")])
    assert (
        np.array(fastmath.gelu_tanh(huge)).tolist() == np.array(huge * mx.array([1, 0, 1])).tolist()
    )
    grad = mx.grad(lambda v: fastmath.gelu_tanh(v).sum())(x)
    numeric = np.gradient(gelu, x64)
    np.testing.assert_allclose(np.array(grad)[1:-1], numeric[1:-1], atol=1e-4)


def test_attention_output_ignores_masked_keys_bitwise():
    """A query's output may not depend on later keys, not even through the softmax's max."""
    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.normal(0, 3, (1, 2, 6, 4)).astype(np.float32)) for _ in range(3))
    k2 = k.at[:, :, 4:].add(50.0)  # later keys with much larger scores
    a = fastmath.scaled_dot_product_attention(q, k, v, 0.5, "causal")
    b = fastmath.scaled_dot_product_attention(q, k2, v, 0.5, "causal")
    assert mx.array_equal(a[:, :, :4], b[:, :, :4]).item()


def reference_attention(q, k, v, scale, keep):
    """float64 numpy softmax(q kᵀ scale) v with grouped k/v heads; keep (B|1, 1, L, S) bool."""
    q, k, v = (np.array(a, dtype=np.float64) for a in (q, k, v))
    G = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    s = np.where(keep, q @ k.swapaxes(-1, -2) * scale, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def test_inference_attention_matches_float64_causal_and_padded():
    """Prefill's compiled attention: GQA, a causal query chunk after a past, and a padding mask
    (B, 1, L, S) with a padded query that sees only itself (no empty softmax rows)."""
    rng = np.random.default_rng(2)
    B, H, K, L, S, hd = 2, 4, 2, 5, 7, 8
    q = mx.array(rng.normal(0, 2, (B, H, L, hd)).astype(np.float32))
    k, v = (mx.array(rng.normal(0, 2, (B, K, S, hd)).astype(np.float32)) for _ in range(2))
    causal = np.arange(S)[None] <= np.arange(S - L, S)[:, None]
    out = fastmath.attention_inference(q, k, v, 0.3, "causal")
    np.testing.assert_allclose(np.array(out), reference_attention(q, k, v, 0.3, causal), atol=2e-6)
    real = np.ones((B, S), bool)
    real[1, :3] = False  # row 1: three padded keys, the first query's own key among them
    keep = causal[None] & real[:, None, :]
    keep |= np.arange(S)[None, None] == np.arange(S - L, S)[None, :, None]
    keep = keep[:, None]
    out = fastmath.attention_inference(q, k, v, 0.3, mx.array(keep))
    np.testing.assert_allclose(np.array(out), reference_attention(q, k, v, 0.3, keep), atol=2e-6)
    k2 = k.at[:, :, 6:].add(50.0)  # a later key with much larger scores: no effect before it
    a = fastmath.attention_inference(q, k, v, 0.3, "causal")
    b = fastmath.attention_inference(q, k2, v, 0.3, "causal")
    assert mx.array_equal(a[:, :, :4], b[:, :, :4]).item()


def test_linear_matches_autodiff_with_contiguous_weight_gradient():
    rng = np.random.default_rng(1)
    x, w, b, c = (
        mx.array(rng.normal(0, 1, s).astype(np.float32))
        for s in [(2, 5, 3), (4, 3), (4,), (2, 5, 4)]
    )
    for bias in (b, None):
        args = (x, w) if bias is None else (x, w, bias)

        def ref(*a):
            return (mx.addmm(a[2], a[0], a[1].T) if len(a) == 3 else a[0] @ a[1].T) * c

        def fast(*a):
            return fastmath.linear(*a) * c

        want = mx.grad(lambda *a: ref(*a).sum(), argnums=tuple(range(len(args))))(*args)
        got = mx.grad(lambda *a: fast(*a).sum(), argnums=tuple(range(len(args))))(*args)
        np.testing.assert_allclose(
            np.array(fastmath.linear(*args)), np.array(ref(*args) / c), rtol=1e-6
        )
        for g, r in zip(got, want):
            np.testing.assert_allclose(np.array(g), np.array(r), rtol=1e-5, atol=1e-6)


def test_fast_math_matches_mlx():
    from mlx_transformer.ops import gelu_tanh_reference as gelu_tanh

    x = mx.array(np.linspace(-30, 30, 20001, dtype=np.float32))
    np.testing.assert_allclose(np.array(fastmath.exp(x)), np.array(mx.exp(x)), rtol=2e-7)
    np.testing.assert_allclose(np.array(fastmath.tanh(x)), np.array(mx.tanh(x)), atol=3e-7)
    np.testing.assert_allclose(np.array(fastmath.gelu_tanh(x)), np.array(gelu_tanh(x)), atol=2e-6)
    for fast, ref in ((fastmath.gelu_tanh, gelu_tanh), (fastmath.exp, mx.exp)):
        y = x / 10  # keep exp's gradient in a comparable range
        got = mx.grad(lambda v, f=fast: f(v).sum())(y)
        want = mx.grad(lambda v, f=ref: f(v).sum())(y)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=2e-5, atol=2e-6)
    logits = mx.array(np.random.default_rng(0).normal(0, 5, (3, 7, 50)).astype(np.float32))
    np.testing.assert_allclose(
        np.array(fastmath.logsumexp(logits)), np.array(mx.logsumexp(logits, axis=-1)), rtol=1e-6
    )


@pytest.mark.parametrize(
    "heads, kv_heads, mask", [(4, 4, "causal"), (4, 2, "padded"), (2, 1, None)]
)
def test_fast_attention_matches_mlx(heads, kv_heads, mask):
    from mlx_transformer.model import attention_mask_4d

    rng = np.random.default_rng(0)
    B, L, hd = 2, 7, 8

    def arr(*shape):
        return mx.array(rng.normal(0, 1, shape).astype(np.float32))

    q, k, v, w = (
        arr(B, heads, L, hd),
        arr(B, kv_heads, L, hd),
        arr(B, kv_heads, L, hd),
        arr(B, heads, L, hd),
    )
    if mask == "padded":
        mask = attention_mask_4d(mx.array([[0, 0, 1, 1, 1, 1, 1], [1] * 7]), L, L)

    def loss(f):
        return lambda q, k, v: (f(q, k, v, scale=hd**-0.5, mask=mask) * w).sum()

    for got, want in zip(
        mx.value_and_grad(loss(fastmath.scaled_dot_product_attention), argnums=(0, 1, 2))(q, k, v),
        mx.value_and_grad(loss(mx.fast.scaled_dot_product_attention), argnums=(0, 1, 2))(q, k, v),
    ):
        for g, r in zip(*((got, want) if isinstance(got, tuple) else ([got], [want]))):
            np.testing.assert_allclose(np.array(g), np.array(r), atol=2e-5)


def test_ops_picks_cpu_kernels_only_where_asked():
    """`ops` is the one switch: with the CPU kernels on (the CPU backend) it runs fastmath's
    functions, bit for bit; turned off, MLX's own."""
    from mlx_transformer import ops

    x = mx.random.normal((4, 64), key=mx.random.key(3)) * 3
    assert ops.cpu_kernels() == (mx.default_device() == mx.cpu)
    with ops.use_cpu_kernels(False):
        assert not ops.cpu_kernels()
        assert mx.array_equal(ops.gelu_tanh(x), ops.gelu_tanh_reference(x)).item()
        assert mx.array_equal(ops.logsumexp(x), mx.logsumexp(x, axis=-1)).item()
    if mx.default_device() == mx.cpu:
        with ops.use_cpu_kernels(True):
            assert mx.array_equal(ops.gelu_tanh(x), fastmath.gelu_tanh(x)).item()
            assert mx.array_equal(ops.silu(x), fastmath.silu(x)).item()
            assert not mx.array_equal(ops.gelu_tanh(x), ops.gelu_tanh_reference(x)).item()


def test_blocked_causal_attention_matches_float64_and_mlx_gradients():
    """Causal self-attention long enough to run in query blocks (131 queries: blocks of 65 and 66,
    grouped k/v heads) equals float64 numpy, and its gradients equal MLX's fused attention's."""
    rng = np.random.default_rng(3)
    B, H, K, hd = 1, 4, 2, 8
    L = 2 * fastmath.CAUSAL_BLOCK + 3
    q, k, v, w = (
        mx.array(rng.normal(0, 1, (B, h, L, hd)).astype(np.float32)) for h in (H, K, K, H)
    )
    keep = (np.arange(L)[None] <= np.arange(L)[:, None])[None, None]
    out = fastmath.scaled_dot_product_attention(q, k, v, 0.3, "causal")
    np.testing.assert_allclose(np.array(out), reference_attention(q, k, v, 0.3, keep), atol=2e-6)

    def loss(f):
        return lambda q, k, v: (f(q, k, v, scale=0.3, mask="causal") * w).sum()

    got = mx.grad(loss(fastmath.scaled_dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    want = mx.grad(loss(mx.fast.scaled_dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.array(g), np.array(r), atol=2e-5)
