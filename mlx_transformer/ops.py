"""The ops `model.py` is written with, and the one place that picks how each one runs.

On Metal and CUDA every op here is MLX's own (fused) kernel. On MLX's Linux CPU backend some are
swapped for `cpu.fastmath`'s versions: polynomial exp/tanh, a softmax whose backward reuses the
saved probabilities, and linear layers whose backward writes the weight gradient contiguous.
They equal MLX's to float32 rounding and are several times faster there (see the README's
"Speed on Linux CPU"). `use_cpu_kernels(False)` turns the swap off, so tests can check that both
paths compute the same function.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import mlx.core as mx
import mlx.nn as nn

from .cpu import fastmath

_cpu_kernels_enabled = True


def cpu_kernels() -> bool:
    """True where `cpu.fastmath` replaces MLX's kernels: on the CPU backend, unless turned off."""
    return _cpu_kernels_enabled and mx.default_device() == mx.cpu


@contextlib.contextmanager
def use_cpu_kernels(enabled: bool) -> Iterator[None]:
    """Within the block, take (or do not take) the CPU kernels. Decided when a function is traced,
    so compile inside the block what should use the choice."""
    global _cpu_kernels_enabled
    previous, _cpu_kernels_enabled = _cpu_kernels_enabled, enabled
    try:
        yield
    finally:
        _cpu_kernels_enabled = previous


class Linear(nn.Linear):
    """`nn.Linear` (same parameters). When training with the CPU kernels its backward writes the
    weight gradient contiguous, so the optimizer's update runs as a vectorised loop."""

    def __call__(self, x: mx.array) -> mx.array:
        if self.training and cpu_kernels():
            return fastmath.linear(x, self.weight, self.get("bias"))
        return super().__call__(x)


def tied_linear(x: mx.array, embedding: mx.array, training: bool) -> mx.array:
    """x @ Eᵀ: the LM head that shares the token embedding E (V, D)."""
    if training and cpu_kernels():
        return fastmath.linear(x, embedding)
    return x @ embedding.T


def scaled_dot_product_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float,
    mask: mx.array | str | None,
    training: bool,
) -> mx.array:
    """softmax(q kᵀ · scale + mask) v; q (B, H, L, hd), k and v (B, K, S, hd) with H % K == 0."""
    # CPU, L > 1: MLX's softmax calls libm's exp (~20 ns per score); training takes fastmath's
    # differentiable attention (compiled with the step), prefill its compiled inference one.
    # Decode (L == 1) has few scores: MLX's kernel.
    L = q.shape[2]
    if L > 1 and cpu_kernels() and training:
        return fastmath.scaled_dot_product_attention(q, k, v, scale, mask)
    if L > 1 and cpu_kernels() and mask is not None:
        return fastmath.attention_inference(q, k, v, scale, mask)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def gelu_tanh_reference(x: mx.array) -> mx.array:
    """GELU with the tanh approximation (GPT-2's "gelu_new"), written out to match it exactly."""
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def gelu_tanh(x: mx.array) -> mx.array:
    return fastmath.gelu_tanh(x) if cpu_kernels() else gelu_tanh_reference(x)


def silu(x: mx.array) -> mx.array:
    return fastmath.compiled_silu(x) if cpu_kernels() else nn.silu(x)


def logsumexp(x: mx.array, axis: int = -1) -> mx.array:
    return fastmath.logsumexp(x, axis=axis) if cpu_kernels() else mx.logsumexp(x, axis=axis)
