"""exp and tanh from multiplies and adds, for MLX's Linux CPU backend.

The `mlx-cpu` wheel is built for baseline x86-64, where `mx.exp` and `mx.tanh` cost ~25 ns per
element (libm calls and software `fma`), against ~0.5 ns for an add: in a small GPT's training
step the GELU's tanh alone took more time than all the matmuls. Written as a short polynomial
of adds and multiplies, `mx.compile` fuses them into one loop that the compiler vectorises:
5-8x faster, with a relative error of ~1e-7 (float32 rounding). On Metal and CUDA the built-in
kernels are already fast; `use_fast_math()` says when to prefer these.
"""

from __future__ import annotations

import math

import mlx.core as mx

LOG2E = 1.4426950408889634
# Adding 1.5 * 2**23 to a float32 in (-2**22, 2**22) rounds it to an integer and leaves that
# integer in the low mantissa bits, where a bit cast can read it.
_ROUND = 12582912.0
_ROUND_BITS = 0x4B400000


def use_fast_math() -> bool:
    """True on the CPU backend, where the polynomial versions beat MLX's own kernels."""
    return mx.default_device() == mx.cpu


def exp(x: mx.array) -> mx.array:
    """e**x for float32: 2**n * p(f), x*log2(e) = n + f, |f| <= 1/2, p a Cephes polynomial.

    Differentiable (the rounding and the bit cast are constants to autodiff; d/dx p(f) 2**n
    is p'(f) 2**n log2(e) ~ exp(x)). Inputs below -87.7 give exactly 0 (2**-127's bit pattern is
    0, flushing what would be denormal), above 88 give the inf-free 2**126.
    """
    dtype = x.dtype
    y = mx.clip(x.astype(mx.float32) * LOG2E, -127.0, 126.0)
    t = mx.stop_gradient(y + _ROUND)
    f = y - (t - _ROUND)  # y - round(y), in [-1/2, 1/2]
    p = 1.535336188319500e-4
    p = p * f + 1.339887440266574e-3
    p = p * f + 9.618437357674640e-3
    p = p * f + 5.550332471162809e-2
    p = p * f + 2.402264791363012e-1
    p = p * f + 6.931472028550421e-1
    p = p * f + 1.0
    two_n = ((t.view(mx.int32) - _ROUND_BITS + 127) << 23).view(mx.float32)  # 2**round(y)
    return (p * two_n).astype(dtype)


def tanh(x: mx.array) -> mx.array:
    """tanh as a 13/6-degree rational function (Eigen's fast tanh), exact to float32 rounding."""
    x = mx.clip(x, -7.90531110763549805, 7.90531110763549805)
    x2 = x * x
    p = x2 * -2.76076847742355e-16 + 2.00018790482477e-13
    p = x2 * p + -8.60467152213735e-11
    p = x2 * p + 5.12229709037114e-08
    p = x2 * p + 1.48572235717979e-05
    p = x2 * p + 6.37261928875436e-04
    p = x2 * p + 4.89352455891786e-03
    q = x2 * 1.19825839466702e-06 + 1.18534705686654e-04
    q = x2 * q + 2.26843463243900e-03
    q = x2 * q + 4.89352518554385e-03
    return x * p / q


_GELU_C = math.sqrt(2.0 / math.pi)


@mx.custom_function
def gelu_tanh(x: mx.array) -> mx.array:
    """GPT-2's GELU (tanh approximation), as model.gelu_tanh but with the fast tanh, and a
    hand-written derivative (one fused loop instead of autodiff through the rational tanh)."""
    return 0.5 * x * (1.0 + tanh(_GELU_C * x * (1.0 + 0.044715 * (x * x))))


@gelu_tanh.vjp
def _gelu_tanh_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    x2 = x * x
    t = tanh(_GELU_C * x * (1.0 + 0.044715 * x2))
    slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * (_GELU_C * (1.0 + 3 * 0.044715 * x2))
    return cotangent * slope


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x) with the fast exp (SwiGLU's gate)."""
    return x / (1.0 + exp(-x))


def logsumexp(x: mx.array, axis: int = -1) -> mx.array:
    """log(sum(exp(x))) over `axis`, stable (max subtracted), with the fast exp."""
    m = mx.stop_gradient(x.max(axis=axis, keepdims=True))
    return mx.log(exp(x - m).sum(axis=axis)) + m.squeeze(axis)


# -- attention ----------------------------------------------------------------------------------


def _attention_probs(q: mx.array, k: mx.array, scale: float, mask) -> mx.array:
    """softmax(q kᵀ * scale), masked keys exactly 0. q (B, K, G, L, hd), k (B, K, 1, S, hd).

    Masked scores are replaced before the row maximum is taken, so a query's output does not
    depend, even in its rounding, on keys it may not see (causality is bit-exact)."""
    s = ((q * scale) @ k.swapaxes(-1, -2)).astype(mx.float32)  # (B, K, G, L, S); softmax in f32
    L, S = s.shape[-2:]
    if isinstance(mask, str):  # "causal": the last query sees every key
        mask = mx.arange(S)[None] <= mx.arange(S - L, S)[:, None]
    if mask is not None:
        if mask.ndim == 4 and mask.shape[1] > 1:  # (B, H, L, S) -> (B, K, G, L, S)
            mask = mask.reshape(mask.shape[0], -1, *s.shape[2:])
        elif mask.ndim == 4:  # (B, 1, L, S) -> (B, 1, 1, L, S)
            mask = mask[:, :, None]
        s = mx.where(mask, s, -1e30)  # exp() of it is exactly 0; every row keeps one real key
    e = exp(s - s.max(axis=-1, keepdims=True))
    return (e * (1.0 / e.sum(axis=-1, keepdims=True))).astype(q.dtype)


_ATTENTION: dict = {}


def _attention_fn(scale: float, causal: bool):
    """A custom-VJP attention for one (scale, causal) pair; the mask, if an array, is an input."""

    @mx.custom_function
    def attention(q, k, v, mask):
        return _attention_probs(q, k, scale, "causal" if causal else mask) @ v

    @attention.vjp
    def attention_vjp(primals, cotangent, output):
        # Flash-attention's backward: recompute the probabilities instead of storing them.
        q, k, v, mask = primals
        p = _attention_probs(q, k, scale, "causal" if causal else mask)  # (B, K, G, L, S)
        dv = (p.swapaxes(-1, -2) @ cotangent).sum(axis=2, keepdims=True)
        dp = cotangent @ v.swapaxes(-1, -2)
        ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
        dq = (ds @ k) * scale
        dk = (ds.swapaxes(-1, -2) @ q).sum(axis=2, keepdims=True) * scale
        return dq, dk, dv, mx.zeros_like(mask)

    return attention


def scaled_dot_product_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None = None
) -> mx.array:
    """Drop-in for `mx.fast.scaled_dot_product_attention` on the CPU backend (fast exp, and a
    backward that recomputes the probabilities). q (B, H, L, hd); k, v (B, K, S, hd), H % K == 0;
    mask None, "causal" or boolean broadcastable to (B, H, L, S) with True = attend."""
    B, H, L, hd = q.shape
    K = k.shape[1]
    key = (float(scale), mask == "causal" if isinstance(mask, str) else False)
    if key not in _ATTENTION:
        _ATTENTION[key] = _attention_fn(*key)
    qg = q.reshape(B, K, H // K, L, hd)  # query heads grouped by the key/value head they share
    kg, vg = k[:, :, None], v[:, :, None]  # (B, K, 1, S, hd)
    m = mask if isinstance(mask, mx.array) else mx.array(True)
    out = _ATTENTION[key](qg, kg, vg, m)  # (B, K, G, L, hd)
    return out.reshape(B, H, L, -1)
