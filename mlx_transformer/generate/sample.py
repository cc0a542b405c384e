"""Samplers and logits processors: small pure functions on logits, composed by two factories.

A *logits processor* maps (history (B, T) token ids, logits (B, V)) to new logits: repetition
penalty, logit bias, banned tokens. History is padded with -1 where a row has no token (left
padding of a batch); processors ignore negative ids.

A *filter* maps logits (B, V) to logits with the excluded tokens set to -inf: top-k, top-p, min-p.
A *sampler* maps logits (B, V) to token ids (B,). `make_sampler` builds one, HF's order:
temperature first, then top-k, top-p, min-p, then a categorical draw (or argmax when temp == 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import mlx.core as mx

from .rules import validate_repetition, validate_sampling

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

NEG_INF = float("-inf")


# -- filters: logits (B, V) -> logits (B, V) with excluded tokens at -inf ----------------------


def apply_temperature(logits: mx.array, temp: float) -> mx.array:
    """Divide by the temperature: < 1 sharpens the distribution, > 1 flattens it."""
    return logits * (1.0 / temp)


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    """Keep exactly the k largest logits of each row (ties broken arbitrarily)."""
    V = logits.shape[-1]
    if k >= V:
        return logits
    drop = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., k:]  # (B, V - k)
    return mx.put_along_axis(logits, drop, mx.array(NEG_INF, logits.dtype), axis=-1)


def apply_top_p(logits: mx.array, p: float) -> mx.array:
    """Nucleus: keep the smallest set of most likely tokens whose probability sums to >= p."""
    order = mx.argsort(-logits, axis=-1)  # most likely first
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits.astype(mx.float32), axis=-1)
    # A token is kept when the mass of the tokens strictly before it is still below p.
    before = mx.cumsum(probs, axis=-1) - probs
    sorted_kept = mx.where(before < p, sorted_logits, mx.array(NEG_INF, logits.dtype))
    inverse = mx.argsort(order, axis=-1)
    return mx.take_along_axis(sorted_kept, inverse, axis=-1)


def apply_min_p(logits: mx.array, min_p: float) -> mx.array:
    """Keep tokens whose probability is at least min_p times the most likely token's."""
    threshold = mx.max(logits, axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logits >= threshold, logits, mx.array(NEG_INF, logits.dtype))


def greedy(logits: mx.array) -> mx.array:
    """The most likely token of each row, (B, V) -> (B,)."""
    return mx.argmax(logits, axis=-1)


# -- logits processors: (history (B, T), logits (B, V)) -> logits ------------------------------


def present_tokens(history: mx.array, vocab_size: int) -> mx.array:
    """(B, V) bool: which tokens occur in each row of history; ids < 0 (padding) are ignored."""
    B = history.shape[0]
    if history.shape[1] == 0:
        return mx.zeros((B, vocab_size), mx.bool_)
    ids = mx.where(history < 0, vocab_size, history)  # padding -> an extra column, dropped below
    marks = mx.zeros((B, vocab_size + 1), mx.bool_)
    marks = mx.put_along_axis(marks, ids, mx.array(True), axis=-1)
    return marks[:, :vocab_size]


def apply_repetition_penalty(logits: mx.array, history: mx.array, penalty: float) -> mx.array:
    """CTRL's penalty on tokens seen in history: positive logits / penalty, negative * penalty."""
    seen = present_tokens(history, logits.shape[-1])
    penalized = mx.where(logits > 0, logits / penalty, logits * penalty)
    return mx.where(seen, penalized, logits)


def make_repetition_penalty(penalty: float, context_size: int = 64) -> LogitsProcessor:
    """Penalize the tokens among the last `context_size` of history (all of it when shorter)."""
    validate_repetition(penalty, context_size)

    def processor(history: mx.array, logits: mx.array) -> mx.array:
        window = min(context_size, history.shape[1])  # MLX slices take 32-bit indices
        return apply_repetition_penalty(logits, history[:, -window:], penalty)

    return processor


def make_logit_bias(bias: Mapping[int, float]) -> LogitsProcessor:
    """Add bias[token] to that token's logit (-inf bans it)."""
    ids = mx.array(list(bias.keys()), mx.int32)
    values = mx.array(list(bias.values()), mx.float32)

    def processor(history: mx.array, logits: mx.array) -> mx.array:
        return logits.at[:, ids].add(values.astype(logits.dtype))

    return processor


def make_logits_processors(
    repetition_penalty: float | None = None,
    repetition_context_size: int = 64,
    logit_bias: Mapping[int, float] | None = None,
    banned_tokens: Sequence[int] = (),
) -> list[LogitsProcessor]:
    """The processors to pass to `generate_step`, applied in order: bias, bans, penalty.

    Args:
        repetition_penalty: > 1 discourages tokens seen in the last `repetition_context_size`
            tokens (prompt included); 1 or None turns it off.
        logit_bias: token id -> amount added to its logit.
        banned_tokens: ids never sampled (their logit becomes -inf).
    """
    if repetition_penalty is not None:
        validate_repetition(repetition_penalty, repetition_context_size)
    bias = dict(logit_bias or {})
    for token in banned_tokens:
        bias[int(token)] = NEG_INF
    processors = []
    if bias:
        processors.append(make_logit_bias(bias))
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(make_repetition_penalty(repetition_penalty, repetition_context_size))
    return processors


# -- sampler factory ---------------------------------------------------------------------------


def make_sampler(
    temp: float = 0.0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
) -> Sampler:
    """A function (B, V) logits -> (B,) token ids.

    Args:
        temp: temperature; 0 = greedy (argmax, and the other settings are ignored).
        top_p: nucleus mass in [0, 1]; 0 or 1 = off (as in mlx-lm).
        min_p: relative probability floor in [0, 1]; 0 = off.
        top_k: keep the k most likely tokens; 0 = off.
        seed: seeds this sampler's own random key, so the same seed gives the same tokens
            whatever else uses MLX's global generator; None = the global generator.
    """
    validate_sampling(temp, top_p, min_p, top_k)
    if temp == 0:
        return greedy
    filters: list[Callable[[mx.array], mx.array]] = []
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))
    if 0 < top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p > 0.0:
        filters.append(lambda x: apply_min_p(x, min_p))
    key = [mx.random.key(seed)] if seed is not None else None

    def sampler(logits: mx.array) -> mx.array:
        logits = apply_temperature(logits.astype(mx.float32), temp)
        for f in filters:
            logits = f(logits)
        if key is None:
            return mx.random.categorical(logits, axis=-1)
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logits, axis=-1, key=sub)

    return sampler
