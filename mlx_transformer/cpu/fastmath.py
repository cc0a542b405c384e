"""exp and tanh from multiplies and adds, for MLX's Linux CPU backend.

The `mlx-cpu` wheel is built for baseline x86-64, where `mx.exp` and `mx.tanh` cost ~25 ns per
element (libm calls and software `fma`), against ~0.5 ns for an add: in a small GPT's training
step the GELU's tanh alone took more time than all the matmuls. Written as a short polynomial
of adds and multiplies, `mx.compile` fuses them into one loop that the compiler vectorises:
5-8x faster, with a relative error of ~1e-7 (float32 rounding). On Metal and CUDA the built-in
kernels are already fast; `mlx_transformer.ops` decides where these replace them.
"""

from __future__ import annotations

import math

import mlx.core as mx

LOG2E = 1.4426950408889634
# Adding 1.5 * 2**23 to a float32 in (-2**22, 2**22) rounds it to an integer and leaves that
# integer in the low mantissa bits, where a bit cast can read it.
_ROUND = 12582912.0
_ROUND_BITS = 0x4B400000


# 2**f on [-1/2, 1/2] (Cephes' exp2f coefficients), c0 + c1 f + ... + c6 f**6.
_EXP2 = (
    1.0,
    6.931472028550421e-1,
    2.402264791363012e-1,
    5.550332471162809e-2,
    9.618437357674640e-3,
    1.339887440266574e-3,
    1.535336188319500e-4,
)


def exp2(y: mx.array) -> mx.array:
    """2**y for float32: 2**n * p(f), n = round(y), f = y - n in [-1/2, 1/2].

    Shaped for `mx.compile`, which fuses at most 11 ops deep and materialises every array used
    by two fused kernels: n is rounded from y + 1.5*2**23 and f recomputed from its own clip (so
    the two share no node), and p is evaluated in Estrin's form (depth 5 instead of Horner's 12).
    Differentiable (n is a constant to autodiff). y below -127 gives exactly 0 (2**-127's bit
    pattern is 0, flushing what would be denormal); above 126 gives 2**126.
    """
    t = mx.stop_gradient(mx.clip(y + _ROUND, _ROUND - 127.0, _ROUND + 126.0))  # n + 1.5*2**23
    f = mx.clip(y * 1.0, -127.0, 126.0) - (t - _ROUND)  # * 1.0: not merged with t's clip
    c, f2 = _EXP2, f * f
    p = (c[0] + c[1] * f) + f2 * (c[2] + c[3] * f) + (f2 * f2) * ((c[4] + c[5] * f) + f2 * c[6])
    two_n = ((t.view(mx.int32) - (_ROUND_BITS - 127)) << 23).view(mx.float32)  # 2**n
    return p * two_n


def exp(x: mx.array) -> mx.array:
    """e**x for float32: 2**n * p(f), x log2(e) = n + f, |f| <= 1/2 (Horner form: fewer ops than
    `exp2`'s fusion-shaped one, which matters where it runs uncompiled, e.g. SwiGLU at prefill).

    Differentiable (the rounding and the bit cast are constants to autodiff). Inputs below -88
    give exactly 0 (2**-127's bit pattern is 0), above 88 give the inf-free 2**126.
    """
    dtype = x.dtype
    y = mx.clip(x.astype(mx.float32) * LOG2E, -127.0, 126.0)
    t = mx.stop_gradient(y + _ROUND)
    f = y - (t - _ROUND)  # y - round(y), in [-1/2, 1/2]
    p = _EXP2[6]
    for c in reversed(_EXP2[:6]):
        p = p * f + c
    two_n = ((t.view(mx.int32) - (_ROUND_BITS - 127)) << 23).view(mx.float32)  # 2**round(y)
    return (p * two_n).astype(dtype)


_TANH_CLIP = 7.90531110763549805  # Eigen's: beyond it the rational function rounds to +-1


def _tanh_inner(z2: mx.array) -> mx.array:
    """The first Horner steps of tanh's numerator in z2 = z*z (split off: see gelu_tanh)."""
    u = z2 * -2.76076847742355e-16 + 2.00018790482477e-13
    u = z2 * u + -8.60467152213735e-11
    return z2 * u + 5.12229709037114e-08


def _tanh_outer(z: mx.array, z2: mx.array, u: mx.array) -> mx.array:
    """tanh(z) = z p(z2) / q(z2) from the numerator's inner steps u."""
    p = z2 * u + 1.48572235717979e-05
    p = z2 * p + 6.37261928875436e-04
    p = z2 * p + 4.89352455891786e-03
    q = z2 * 1.19825839466702e-06 + 1.18534705686654e-04
    q = z2 * q + 2.26843463243900e-03
    q = z2 * q + 4.89352518554385e-03
    return z * p / q


def tanh(x: mx.array) -> mx.array:
    """tanh as a 13/6-degree rational function (Eigen's fast tanh), exact to float32 rounding."""
    z = mx.clip(x, -_TANH_CLIP, _TANH_CLIP)
    z2 = z * z
    return _tanh_outer(z, z2, _tanh_inner(z2))


_GELU_C = math.sqrt(2.0 / math.pi)


@mx.custom_function
def _gelu_tanh_parts(x: mx.array) -> tuple[mx.array, ...]:
    """GELU-tanh and the arrays its backward needs, as `tanh` computes them (same rounding).

    mx.compile fuses at most 11 ops deep and turns whatever lies deeper into kernel inputs; a
    scalar constant cut off that way becomes a stride-0 input and the whole kernel a slow
    strided loop. Returning z and the numerator's inner Horner steps u makes them kernel
    boundaries chosen here (each output is materialised), and every kernel stays contiguous.
    """
    z = mx.clip(_GELU_C * x * (1.0 + 0.044715 * (x * x)), -_TANH_CLIP, _TANH_CLIP)
    z2 = z * z
    u = _tanh_inner(z2)
    t = _tanh_outer(z, z2, u)
    return 0.5 * x * (1.0 + t), t, z, u


@_gelu_tanh_parts.vjp
def _gelu_tanh_vjp(x: mx.array, cotangents: tuple, outputs: tuple) -> mx.array:
    t, x2 = outputs[1], x * x  # the forward's tanh, kept as autodiff would keep it
    slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * (_GELU_C * (1.0 + 3 * 0.044715 * x2))
    return cotangents[0] * slope


def gelu_tanh(x: mx.array) -> mx.array:
    """GPT-2's GELU (tanh approximation): model.gelu_tanh with `tanh`'s rational function (equal
    bit for bit to composing the two) and a hand-written derivative reusing the forward's tanh."""
    return _gelu_tanh_parts(x)[0]


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x) with the fast exp (SwiGLU's gate)."""
    return x / (1.0 + exp(-x))


# Compiled: one fused loop instead of ~12 passes over the (B, L, F) gate where nothing else
# compiles it (prefill); inside a compiled function (training, decode) it is inlined.
compiled_silu = mx.compile(silu)


def logsumexp(x: mx.array, axis: int = -1) -> mx.array:
    """log(sum(exp(x))) over `axis`, stable (max subtracted), with the fast exp."""
    m = mx.stop_gradient(x.max(axis=axis, keepdims=True))
    return mx.log(exp(x - m).sum(axis=axis)) + m.squeeze(axis)


# -- linear layers -------------------------------------------------------------------------------


def _linear_grads(x: mx.array, weight: mx.array, cotangent: mx.array) -> tuple[mx.array, mx.array]:
    """dx and dW of x @ Wᵀ. dW is computed as cotᵀ x, (out, in) and contiguous: autodiff's
    transpose of xᵀ cot is a strided view, and every optimizer kernel reading it a strided loop."""
    flat = cotangent.reshape(-1, cotangent.shape[-1])
    return cotangent @ weight, flat.T @ x.reshape(-1, x.shape[-1])


@mx.custom_function
def _linear_bias(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    return mx.addmm(bias, x, weight.T)


@_linear_bias.vjp
def _linear_bias_vjp(primals, cotangent, output):
    x, weight, _ = primals
    dx, dw = _linear_grads(x, weight, cotangent)
    return dx, dw, cotangent.reshape(-1, cotangent.shape[-1]).sum(axis=0)


@mx.custom_function
def _linear_no_bias(x: mx.array, weight: mx.array) -> mx.array:
    return x @ weight.T


@_linear_no_bias.vjp
def _linear_no_bias_vjp(primals, cotangent, output):
    return _linear_grads(*primals, cotangent)


def linear(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """x @ weightᵀ (+ bias), as `nn.Linear`, with a backward that writes dW contiguous."""
    return _linear_no_bias(x, weight) if bias is None else _linear_bias(x, weight, bias)


# -- attention ----------------------------------------------------------------------------------


def _softmax_fn(scale: float, causal: bool):
    """softmax(s * scale) over the last axis with masked keys exactly 0, as a custom function
    whose VJP uses the saved probabilities: ds = p * (dp - sum(dp * p)) * scale."""

    @mx.custom_function
    def softmax(s: mx.array, mask: mx.array) -> mx.array:
        s = s.astype(mx.float32) * (scale * LOG2E)  # base 2: exp2 needs no further multiply
        L, S = s.shape[-2:]
        if causal:  # the last query sees every key
            mask = mx.arange(S)[None] <= mx.arange(S - L, S)[:, None]
        # Masked scores are replaced before the row maximum is taken, so a query's output does
        # not depend, even in its rounding, on keys it may not see (causality is bit-exact).
        s = mx.where(mask, s, -1e30)  # exp2 of it is exactly 0; every row keeps one real key
        e = exp2(s - s.max(axis=-1, keepdims=True))
        return e * (1.0 / e.sum(axis=-1, keepdims=True))

    @softmax.vjp
    def softmax_vjp(primals, cotangent, p):
        s, mask = primals
        ds = p * (cotangent - (cotangent * p).sum(axis=-1, keepdims=True)) * scale
        return ds.astype(s.dtype), mx.zeros_like(mask)

    return softmax


_SOFTMAX: dict = {}


# Causal self-attention over this many queries or more runs in blocks of this many queries.
CAUSAL_BLOCK = 64


def scaled_dot_product_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None = None
) -> mx.array:
    """Drop-in for `mx.fast.scaled_dot_product_attention` on the CPU backend: the softmax runs in
    float32 with the fast exp2 and a backward from the saved probabilities (autodiff does the
    matmuls). q (B, H, L, hd); k, v (B, K, S, hd), H % K == 0; mask None, "causal" or boolean
    broadcastable to (B, H, L, S) with True = attend.

    Causal self-attention (L == S) of 2 * CAUSAL_BLOCK queries or more runs one block of queries
    at a time over the keys up to the block's end: the scores above the diagonal's blocks are
    never computed (3/8 of them at 4 blocks), and the smaller products run faster. At 256
    queries, 6 heads of 64, forward + backward took half the time."""
    L = q.shape[2]
    if not (isinstance(mask, str) and mask == "causal" and L == k.shape[2]):
        return _attention(q, k, v, scale, mask)
    n = max(1, L // CAUSAL_BLOCK)
    bounds = [L * i // n for i in range(n + 1)]
    blocks = [
        _attention(q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], scale, mask)
        for lo, hi in zip(bounds, bounds[1:])
    ]
    return blocks[0] if n == 1 else mx.concatenate(blocks, axis=2)


def _attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None
) -> mx.array:
    B, H, L, hd = q.shape
    K = k.shape[1]
    key = (float(scale), isinstance(mask, str) and mask == "causal")
    if key not in _SOFTMAX:
        _SOFTMAX[key] = _softmax_fn(*key)
    if K != H:  # group query heads by the key/value head they share: (B, K, G, L, hd)
        G = H // K
        q, k, v = q.reshape(B, K, G, L, hd), k[:, :, None], v[:, :, None]
        if isinstance(mask, mx.array) and mask.ndim == 4:  # (B, H|1, L, S) -> (B, K|1, G|1, L, S)
            grouped = mask.shape[1] > 1
            mask = (
                mask.reshape(mask.shape[0], K, G, *mask.shape[2:]) if grouped else mask[:, :, None]
            )
    m = mask if isinstance(mask, mx.array) else mx.array(True)
    p = _SOFTMAX[key](q @ k.swapaxes(-1, -2), m).astype(q.dtype)
    return (p @ v).reshape(B, H, L, -1)


@mx.compile
def _masked_softmax2(s: mx.array, mask: mx.array) -> mx.array:
    """softmax over the last axis of scores already in base 2; masked keys exactly 0."""
    s = mx.where(mask, s.astype(mx.float32), -1e30)  # every row keeps a real key (itself)
    e = exp2(s - s.max(axis=-1, keepdims=True))
    return e * (1.0 / e.sum(axis=-1, keepdims=True))


def attention_inference(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str
) -> mx.array:
    """`scaled_dot_product_attention` for prefill (no gradient): the scale is folded into q and
    the softmax is one compiled function (5 passes over the scores instead of ~20 uncompiled;
    MLX's own softmax calls libm's exp). Same arguments; mask "causal" or boolean."""
    B, H, L, hd = q.shape
    K, S = k.shape[1], k.shape[2]
    if isinstance(mask, str):
        mask = mx.arange(S)[None] <= mx.arange(S - L, S)[:, None]  # (L, S), last query sees all
    G = H // K
    q = (q * (scale * LOG2E)).reshape(B, K, G, L, hd)  # (B, K, G, L, hd): heads sharing k/v
    if mask.ndim == 4:  # (B, H|1, L, S) -> (B, K|1, G|1, L, S)
        Bm, Hm = mask.shape[:2]
        mask = mask.reshape(Bm, K, G, L, S) if Hm > 1 else mask[:, :, None]
    p = _masked_softmax2(q @ k[:, :, None].swapaxes(-1, -2), mask).astype(v.dtype)
    return (p @ v[:, :, None]).reshape(B, H, L, hd)
