"""Each sampler and logits processor alone, then the factories that compose them."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_transformer.generate.sample import (
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    greedy,
    make_logits_processors,
    make_repetition_penalty,
    make_sampler,
    present_tokens,
)

LOGITS = mx.array([[1.0, 3.0, 2.0, -1.0, 0.5], [0.0, -2.0, 4.0, 4.5, 1.0]])


def kept(logits: mx.array) -> list[set[int]]:
    return [set(np.flatnonzero(np.isfinite(row)).tolist()) for row in np.array(logits)]


@pytest.mark.parametrize("k", [1, 2, 4, 5, 9])
def test_top_k_keeps_exactly_k(k):
    out = apply_top_k(LOGITS, k)
    order = np.argsort(-np.array(LOGITS), axis=-1)
    assert kept(out) == [set(order[0, :k].tolist()), set(order[1, :k].tolist())]
    finite = np.isfinite(np.array(out))
    assert np.array_equal(np.array(out)[finite], np.array(LOGITS)[finite])  # values untouched


@pytest.mark.parametrize("p", [0.05, 0.5, 0.7, 0.9, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    out = apply_top_p(LOGITS, p)
    probs = np.array(mx.softmax(LOGITS, axis=-1))
    for row, keep in zip(probs, kept(out)):
        order = np.argsort(-row)
        n = int(np.searchsorted(np.cumsum(row[order]), p) + 1)  # smallest prefix with mass >= p
        assert keep == set(order[:n].tolist())
        assert row[list(keep)].sum() >= p
        assert row[order[: n - 1]].sum() < p  # one fewer is not enough


def test_min_p_keeps_tokens_above_a_fraction_of_the_top():
    out = apply_min_p(LOGITS, 0.3)
    probs = np.array(mx.softmax(LOGITS, axis=-1))
    expected = [set(np.flatnonzero(r >= 0.3 * r.max()).tolist()) for r in probs]
    assert kept(out) == expected
    assert kept(apply_min_p(LOGITS, 1.0)) == [{1}, {3}]


def test_temperature_scales_logits():
    assert np.allclose(np.array(apply_temperature(LOGITS, 0.5)), 2 * np.array(LOGITS))


def test_temperature_zero_is_greedy():
    sampler = make_sampler(temp=0.0, top_k=3, top_p=0.5, seed=1)
    assert sampler is greedy
    assert sampler(LOGITS).tolist() == [1, 3]


def test_sampling_follows_the_distribution_and_respects_filters():
    logits = mx.array([[math.log(0.6), math.log(0.3), math.log(0.1)]])
    sampler = make_sampler(temp=1.0, seed=0)
    draws = np.array([sampler(logits).item() for _ in range(2000)])
    assert np.allclose(np.bincount(draws, minlength=3) / 2000, [0.6, 0.3, 0.1], atol=0.04)
    top2 = make_sampler(temp=1.0, top_k=2, seed=0)
    assert {top2(logits).item() for _ in range(300)} == {0, 1}
    nucleus = make_sampler(temp=1.0, top_p=0.5, seed=0)
    assert {nucleus(logits).item() for _ in range(100)} == {0}


def test_same_seed_same_draws_different_seed_different_draws():
    logits = mx.zeros((4, 50))

    def draws(seed):
        s = make_sampler(temp=1.0, seed=seed)
        return [s(logits).tolist() for _ in range(5)]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)


def test_bad_sampler_settings_are_errors():
    for kwargs in (dict(temp=-1), dict(top_p=1.5), dict(min_p=-0.1), dict(top_k=-2)):
        with pytest.raises(ValueError):
            make_sampler(**kwargs)


def test_present_tokens_ignores_padding():
    history = mx.array([[-1, -1, 2, 2], [0, 4, 1, -1]])
    marks = np.array(present_tokens(history, 5))
    assert marks.tolist() == [
        [False, False, True, False, False],
        [True, True, False, False, True],
    ]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    history = mx.array([[1, 3, -1], [-1, -1, -1]])
    out = np.array(apply_repetition_penalty(LOGITS, history, 2.0))
    expected = np.array(LOGITS)
    expected[0, 1] = 3.0 / 2
    expected[0, 3] = -1.0 * 2
    assert np.allclose(out, expected)


def test_repetition_penalty_only_looks_at_its_window():
    (processor,) = make_logits_processors(repetition_penalty=2.0, repetition_context_size=2)
    history = mx.array([[1, 0, 2]])  # token 1 is outside the last 2
    out = np.array(processor(history, LOGITS[:1]))
    assert np.allclose(out, [[0.5, 3.0, 1.0, -1.0, 0.5]])


def test_logit_bias_and_banned_tokens():
    processors = make_logits_processors(logit_bias={0: 10.0, 4: -0.5}, banned_tokens=[1])
    out = LOGITS
    for p in processors:
        out = p(mx.zeros((2, 0), mx.int32), out)
    expected = np.array(LOGITS) + np.array([10.0, -np.inf, 0, 0, -0.5])
    assert np.array_equal(np.array(out), expected)
    assert greedy(out).tolist() == [0, 0]


def test_no_processors_by_default():
    assert make_logits_processors() == []
    assert make_logits_processors(repetition_penalty=1.0) == []


def test_a_repetition_window_past_the_history_is_the_whole_history():
    """MLX slices take 32-bit indices: a window of 10**12 used to raise."""
    logits = mx.array([[1.0, -1.0, 2.0, 0.5]])
    history = mx.array([[0, 1, 3]])
    whole = make_repetition_penalty(2.0, 3)(history, logits)
    for size in (4, 10**12):
        assert mx.array_equal(make_repetition_penalty(2.0, size)(history, logits), whole)


@pytest.mark.parametrize(
    "penalty, size, message",
    [
        (0.0, 64, "repetition penalty must be a positive number"),
        (float("nan"), 64, "repetition penalty must be a positive number"),
        (float("inf"), 64, "repetition penalty must be a positive number"),
        (1.2, 0, "repetition context size must be a positive integer"),
        (1.2, 2.5, "repetition context size must be a positive integer"),
    ],
)
def test_bad_repetition_settings_are_errors(penalty, size, message):
    with pytest.raises(ValueError, match=message):
        make_logits_processors(repetition_penalty=penalty, repetition_context_size=size)
