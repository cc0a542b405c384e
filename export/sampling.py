"""Samplers for the ONNX runtime, in numpy: the same small pure functions as
`mlx_transformer/generate/sample.py` (which is MLX), with the same order and conventions.

Logits processors map (history (B, T), logits (B, V)) to logits; history is padded with -1.
Filters set excluded tokens to -inf. A sampler maps logits (B, V) to ids (B,): HF's order,
temperature, then top-k, top-p, min-p, then a categorical draw (argmax when temp == 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from mlx_transformer.generate.rules import validate_sampling

Sampler = Callable[[np.ndarray], np.ndarray]
NEG_INF = -np.inf


def apply_temperature(logits: np.ndarray, temp: float) -> np.ndarray:
    return logits * (1.0 / temp)


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep exactly the k largest logits of each row."""
    if k >= logits.shape[-1]:
        return logits
    drop = np.argpartition(-logits, k - 1, axis=-1)[..., k:]
    out = logits.copy()
    np.put_along_axis(out, drop, NEG_INF, axis=-1)
    return out


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus: the smallest set of most likely tokens whose probability sums to >= p."""
    order = np.argsort(-logits, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    probs = softmax(sorted_logits)
    before = np.cumsum(probs, axis=-1) - probs  # mass strictly before each token
    sorted_kept = np.where(before < p, sorted_logits, NEG_INF)
    out = np.empty_like(logits)
    np.put_along_axis(out, order, sorted_kept, axis=-1)
    return out


def apply_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Keep tokens at least min_p times as likely as the most likely one."""
    threshold = logits.max(axis=-1, keepdims=True) + math.log(min_p)
    return np.where(logits >= threshold, logits, NEG_INF)


def apply_repetition_penalty(logits: np.ndarray, history: np.ndarray, penalty: float):
    """CTRL's penalty on tokens seen in history (ids < 0 ignored): positive / p, negative * p."""
    B, V = logits.shape
    seen = np.zeros((B, V + 1), bool)
    ids = np.where(history < 0, V, history)
    np.put_along_axis(seen, ids.astype(np.int64), True, axis=-1)
    penalized = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen[:, :V], penalized, logits)


def softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def greedy(logits: np.ndarray) -> np.ndarray:
    return logits.argmax(axis=-1)


def make_sampler(
    temp: float = 0.0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
) -> Sampler:
    """A function (B, V) logits -> (B,) ids; temp 0 = greedy. Same seed, same tokens."""
    validate_sampling(temp, top_p, min_p, top_k)
    if temp == 0:
        return greedy
    filters: list[Callable[[np.ndarray], np.ndarray]] = []
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))
    if 0 < top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p > 0.0:
        filters.append(lambda x: apply_min_p(x, min_p))
    rng = np.random.default_rng(seed)

    def sampler(logits: np.ndarray) -> np.ndarray:
        x = apply_temperature(logits.astype(np.float64), temp)
        for f in filters:
            x = f(x)
        cdf = np.cumsum(softmax(x), axis=-1)
        u = rng.random((cdf.shape[0], 1)) * cdf[:, -1:]  # scaled: rounding never runs past V
        return (cdf <= u).sum(axis=-1)  # inverse CDF; zero-probability tokens are never drawn

    return sampler
