"""Training's step: loss, accumulation, streams, AdamW, schedule, precision (no run folder).

Tiny models (2 layers, width 32, context 16) on random tokens; `test_train.py` runs the loop.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_transformer.config import ModelConfig
from mlx_transformer.cpu.training import buffer_cache
from mlx_transformer.model import Transformer
from mlx_transformer.train.args import TrainingArgs
from mlx_transformer.train.step import (
    Stepper,
    loss_sum,
    lr_schedule,
    make_optimizer,
    shards,
    step_memory,
)

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    hidden_act="gelu_tanh",
)


# -- the step --------------------------------------------------------------------------------------


def tiny_model(vocab: int = 50, seed: int = 0, **overrides) -> Transformer:
    mx.random.seed(seed)
    model = Transformer(ModelConfig(vocab_size=vocab, **{**TINY, **overrides}))
    model.train()
    mx.eval(model.parameters())
    return model


def random_batch(rng, B: int, L: int = 16, vocab: int = 50) -> tuple:
    w = rng.integers(0, vocab, (B, L + 1)).astype(np.int32)
    return (mx.array(w[:, :-1]), mx.array(w[:, 1:]), None, None)


def test_overfits_one_batch():
    model = tiny_model()
    args = TrainingArgs(learning_rate=1e-2, warmup_steps=5, max_steps=150, weight_decay=0.0)
    stepper = Stepper(model, make_optimizer(args, model.trainable_parameters()), grad_clip=1.0)
    batch = random_batch(np.random.default_rng(0), 4)
    for _ in range(150):
        loss, _ = stepper.step(batch)
        mx.eval(stepper.state, loss)
    assert loss.item() < 0.05, loss.item()


def run_steps(model: Transformer, batches: list[list[tuple]], **stepper_kw) -> Transformer:
    """One optimizer step per entry of `batches`, accumulating over its micro-batches."""
    args = TrainingArgs(learning_rate=1e-2, warmup_steps=0, grad_clip=0.5)
    optimizer = make_optimizer(args, model.trainable_parameters())
    stepper = Stepper(model, optimizer, grad_clip=args.grad_clip, **stepper_kw)
    for micro in batches:
        acc = None
        for b in micro[:-1]:
            acc = stepper.accumulate(b, acc)
        out = stepper.step(micro[-1], acc)
        mx.eval(stepper.state, out)
    return model


def concat(batches: list[tuple]) -> tuple:
    return tuple(mx.concatenate(parts) for parts in zip(*(b[:2] for b in batches))) + (None, None)


def test_accumulation_equals_one_big_batch():
    rng = np.random.default_rng(1)
    steps = [[random_batch(rng, 2) for _ in range(4)] for _ in range(3)]
    accumulated = run_steps(tiny_model(), steps)
    big = run_steps(tiny_model(), [[concat(micro)] for micro in steps])
    for (name, a), (_, b) in zip(
        tree_flatten(accumulated.parameters()), tree_flatten(big.parameters())
    ):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5, err_msg=name)


@pytest.mark.parametrize("streams", [2, 3])
def test_streams_equal_one_stream(streams):
    """A micro-batch split across concurrent streams (3 rows over 2 or 3 streams: uneven shards,
    one row each) gives the whole batch's loss sum, token count and gradients, accumulation
    included. (Compared before AdamW, whose m/sqrt(v) turns the summation order's float32
    rounding into 1e-5 steps where a gradient is ~0.)"""
    rng = np.random.default_rng(4)
    micro = [random_batch(rng, 3) for _ in range(2)]
    results = []
    for n in (1, streams):
        model = tiny_model()
        args = TrainingArgs()
        stepper = Stepper(model, make_optimizer(args, model.trainable_parameters()), streams=n)
        acc = stepper.accumulate(micro[1], stepper.accumulate(micro[0]))
        mx.eval(acc)
        results.append(acc)
    (total1, count1, grads1), (total, count, grads) = results
    assert count.item() == count1.item() == 2 * 3 * 16
    assert total.item() == pytest.approx(total1.item(), rel=1e-6)
    # Sums over 96 tokens: float32 rounding is ~1e-6 of the largest gradient (and k_proj.bias's
    # exact-zero gradient is pure rounding).
    scale = max(np.abs(np.array(g)).max() for _, g in tree_flatten(grads1))
    for (name, a), (_, b) in zip(tree_flatten(grads1), tree_flatten(grads)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * scale, err_msg=name)


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_update_gets_the_clipped_gradient_of_the_mean_loss(clip):
    """The step's AdamW receives d(mean loss)/dW, clipped to `clip` in global norm (0: off), as
    plain autodiff and optim.clip_grad_norm give it; the returned norm is the unclipped one.
    Compared in the first moment, which after one step is (1 - beta1) * that gradient."""
    rng = np.random.default_rng(5)
    batch = random_batch(rng, 3)
    args = TrainingArgs(learning_rate=1e-2, warmup_steps=0, grad_clip=clip)
    moments, norms = [], []
    for compiled in (True, False):
        model = tiny_model()
        optimizer = make_optimizer(args, model.trainable_parameters())
        if compiled:
            _, norm = Stepper(model, optimizer, grad_clip=clip).step(batch)
        else:

            def mean_loss(params, model=model):
                model.update(params)
                total, count = loss_sum(model, batch)
                return total / count

            grads = mx.grad(mean_loss)(model.trainable_parameters())
            clipped, norm = optim.clip_grad_norm(grads, clip if clip > 0 else math.inf)
            optimizer.update(model, clipped)
        mx.eval(optimizer.state, norm)
        state = tree_flatten(optimizer.state)
        moments.append({k: np.array(v) for k, v in state if k.endswith(".m")})
        norms.append(norm.item())
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)
    scale = max(np.abs(m).max() for m in moments[1].values())
    assert moments[0].keys() == moments[1].keys() and len(moments[0]) > 10
    for name, m in moments[1].items():
        np.testing.assert_allclose(moments[0][name], m, rtol=1e-4, atol=1e-6 * scale, err_msg=name)


def test_shards_cover_the_batch_with_masks():
    batch = random_batch(np.random.default_rng(5), 5)
    mask = mx.ones(batch[1].shape)
    parts = shards(batch[:2] + (mask, None), 3)
    assert [p[0].shape[0] for p in parts] == [1, 2, 2]
    assert all(p[3] is None for p in parts)
    for i in range(3):
        joined = mx.concatenate([p[i] for p in parts])
        assert mx.array_equal(joined, (batch[:2] + (mask,))[i]).item()
    assert len(shards(batch, 8)) == 5  # never an empty shard


def test_loss_mask_counts_only_masked_tokens():
    model = tiny_model()
    model.eval()
    inputs, targets, _, _ = random_batch(np.random.default_rng(2), 2)
    mask = mx.zeros(targets.shape).at[:, 5:9].add(1.0)
    total, count = loss_sum(model, (inputs, targets, mask, None))
    full, _ = loss_sum(model, (inputs, targets, None, None))
    other = mx.array(np.where(np.array(mask) > 0, np.array(targets), 7).astype(np.int32))
    total_other, _ = loss_sum(model, (inputs, other, mask, None))
    assert count.item() == 8 and total.item() < full.item()
    assert total.item() == pytest.approx(total_other.item(), rel=1e-6)  # unmasked targets ignored


def test_lr_schedule_is_nanogpt():
    peak, floor, warmup, decay = 1e-3, 1e-4, 100, 2000
    schedule = lr_schedule(peak, floor, warmup, decay)

    def nanogpt(it):
        if it < warmup:
            return peak * (it + 1) / (warmup + 1)
        if it > decay:
            return floor
        ratio = (it - warmup) / (decay - warmup)
        return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - floor)

    for it in (0, 50, 99, 100, 101, 1000, 1999, 2000, 2500):
        assert schedule(mx.array(it)).item() == pytest.approx(nanogpt(it), rel=1e-5)


def test_weight_decay_spares_norms_and_biases():
    model = tiny_model()
    args = TrainingArgs(learning_rate=0.1, warmup_steps=0, weight_decay=0.5, min_learning_rate=0.1)
    optimizer = make_optimizer(args, model.trainable_parameters())
    before = dict(tree_flatten(model.parameters()))
    zero = {k: mx.zeros_like(v) for k, v in before.items()}
    optimizer.update(model, tree_unflatten(list(zero.items())))
    after = dict(tree_flatten(model.parameters()))
    for name, p in before.items():
        ratio = np.array(after[name]) / np.where(np.array(p) == 0, 1, np.array(p))
        expected = 1 - 0.1 * 0.5 if p.ndim >= 2 else 1.0
        np.testing.assert_allclose(ratio[np.array(p) != 0], expected, rtol=1e-5, err_msg=name)


def test_bfloat16_keeps_float32_masters_and_learns():
    model = tiny_model()
    args = TrainingArgs(learning_rate=1e-2, warmup_steps=0)
    stepper = Stepper(
        model, make_optimizer(args, model.trainable_parameters()), "bfloat16", grad_clip=1.0
    )
    batch = random_batch(np.random.default_rng(3), 4)
    losses = []
    for _ in range(30):
        loss, _ = stepper.step(batch)
        mx.eval(stepper.state, loss)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}


def test_buffer_cache_raises_the_cpu_limit_then_restores_it():
    before = mx.set_cache_limit(32 << 20)
    try:
        with buffer_cache(256 << 20):
            assert mx.set_cache_limit(256 << 20) == 256 << 20  # (returns the limit in force)
        assert mx.set_cache_limit(32 << 20) == 32 << 20
    finally:
        mx.set_cache_limit(before)


def test_step_memory_is_a_lower_bound_of_a_steps_peak():
    """Training refuses a batch whose step_memory exceeds the available memory: that must never
    refuse a step that fits (the estimate stays below the measured peak), and must not be so low
    that it lets absurd batches through (within 4x of it)."""
    model = tiny_model(vocab=400)
    optimizer = make_optimizer(TrainingArgs(), model.trainable_parameters())
    stepper = Stepper(model, optimizer, grad_clip=1.0)
    mx.eval(stepper.state)
    batch = random_batch(np.random.default_rng(6), 64, vocab=400)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    for _ in range(2):
        mx.eval(stepper.state, stepper.step(batch))
    peak = mx.get_peak_memory() - base
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    estimate = step_memory(model.config, 64, 16, "float32", trainable)
    assert estimate < peak < 4 * estimate, (estimate, peak)
