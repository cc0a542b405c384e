"""The optimizer step: loss → gradients (accumulated, averaged across processes) → clip → AdamW.

The step's functions are compiled with their state passed explicitly (model, optimizer, RNG)
and `mx.eval` runs once per step (see `Stepper`). On the CPU backend each micro-batch is split
across MLX streams, one worker thread each: MLX runs a stream's ops on one core, so one stream
leaves a 2-core machine's second core idle outside the matmuls. Losses are summed over tokens
and divided by the token count of the whole step (all shards, micro-batches and processes): k
micro-batches of n equal one batch of k*n, and 2 processes of n equal 1 process of 2n, up to
float rounding.

Precision ("float32" | "bfloat16" | "bfloat16-pure"):
  bfloat16       float32 master weights and optimizer state; the trainable weights are cast to
                 bf16 inside the differentiated function, so matmuls run in bf16 and gradients
                 come back in float32. Norm statistics, softmax and the loss run in float32.
  bfloat16-pure  the weights and the AdamW moments are stored in bf16 (half the memory).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .. import ops
from ..data.batches import Batch
from ..errors import UserError
from ..model import Transformer

# A data.Batch as the compiled step takes it: (inputs, targets, loss_mask, attention_mask),
# MLX arrays (B, L), masks None for "all ones". `to_mx` converts.
BatchArrays = tuple[mx.array, mx.array, mx.array | None, mx.array | None]


def to_mx(batch: Batch) -> BatchArrays:
    """A data.Batch (numpy) as the step's tuple of MLX arrays."""

    def arr(x: np.ndarray | None) -> mx.array | None:
        return None if x is None else mx.array(x)

    return (arr(batch.inputs), arr(batch.targets), arr(batch.loss_mask), arr(batch.attention_mask))


class AdamW(optim.AdamW):
    """AdamW (with bias correction, as PyTorch) that decays only matrices and embeddings.

    Norm gains and biases (1-D) are not decayed: pulling a LayerNorm gain towards 0 fights the
    normalisation, and nanoGPT and GPT-2 leave them alone too.
    """

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        if parameter.ndim < 2:
            return optim.Adam.apply_single(self, gradient, parameter, state)
        return super().apply_single(gradient, parameter, state)


def lr_schedule(
    peak: float, floor: float, warmup: int, decay_steps: int
) -> Callable[[mx.array], mx.array]:
    """nanoGPT's schedule, as a function of the number of updates done so far (0 first).

    lr(s) = peak * (s+1)/(warmup+1) for s < warmup, then cosine from peak down to `floor` at
    `decay_steps`, then `floor`.
    """
    span = max(1, decay_steps - warmup)

    def schedule(step: mx.array) -> mx.array:
        s = step.astype(mx.float32)
        warm = peak * (s + 1) / (warmup + 1)
        progress = mx.clip((s - warmup) / span, 0.0, 1.0)
        cosine = floor + 0.5 * (1.0 + mx.cos(math.pi * progress)) * (peak - floor)
        return mx.where(s < warmup, warm, cosine)

    return schedule


# -- loss -----------------------------------------------------------------------------------------


def token_losses(
    model: Transformer,
    inputs: mx.array,
    targets: mx.array,
    attention_mask: mx.array | None = None,
) -> mx.array:
    """Cross-entropy in nats of each next-token prediction, float32, (B, L)."""
    logits = model(inputs, attention_mask=attention_mask).astype(mx.float32)  # (B, L, V)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # (B, L)
    return ops.logsumexp(logits, axis=-1) - picked


def loss_sum(model: Transformer, batch: BatchArrays) -> tuple[mx.array, mx.array]:
    """(sum of token losses, number of tokens counted): loss_mask picks the tokens that count."""
    inputs, targets, loss_mask, attention_mask = batch
    losses = token_losses(model, inputs, targets, attention_mask)
    if loss_mask is None:
        return losses.sum(), mx.array(losses.size, mx.float32)
    mask = loss_mask.astype(mx.float32)
    return (losses * mask).sum(), mask.sum()


def cast_params(model: nn.Module, dtype: mx.Dtype, trainable_too: bool) -> None:
    """Store the frozen (and, if asked, the trainable) floating-point weights in `dtype`."""
    trainable = {id(v) for _, v in tree_flatten(model.trainable_parameters())}

    def cast(p: mx.array) -> mx.array:
        if not mx.issubdtype(p.dtype, mx.floating) or (id(p) in trainable and not trainable_too):
            return p
        return p.astype(dtype)

    model.update(tree_map(cast, model.parameters()))


# -- the step -------------------------------------------------------------------------------------


class Stepper:
    """Compiled gradient and update functions sharing [model.state, optimizer.state, RNG].

    A micro-batch is split into one shard per stream; each shard's loss sum, token count and
    gradients come from one compiled function, which MLX compiles once per stream (its cache is
    keyed by the default stream), so each stream's graph is fused on its own: one graph over
    all streams would share its constants across streams and fuse less. The sums are added, and
    a second compiled function averages, clips and applies AdamW. `mx.eval` runs once per step.

    Build it after loading or restoring the model and optimizer: the compiled functions hold on
    to those state trees, so they must not be replaced afterwards (update them in place).
    """

    def __init__(
        self,
        model: Transformer,
        optimizer: optim.Optimizer,
        precision: str = "float32",
        grad_clip: float = 0.0,
        compile: bool = True,
        group: mx.distributed.Group | None = None,
        streams: int = 1,
    ):
        self.model, self.optimizer = model, optimizer
        # Shard i of each micro-batch runs on stream i; the shards' graphs are independent until
        # their loss sums and gradients are added, so the streams' threads run them concurrently.
        self.streams = [mx.default_stream(mx.default_device())] + [
            mx.new_stream(mx.default_device()) for _ in range(streams - 1)
        ]
        self.grad_clip = grad_clip
        self.group = group
        self.world_size = group.size() if group is not None else 1
        # Mixed precision: float32 masters, bf16 copies made inside the differentiated function.
        self.compute_dtype = mx.bfloat16 if precision == "bfloat16" else None
        self._value_and_grad = mx.value_and_grad(self._loss_of_params)
        self.state = [model.state, optimizer.state, mx.random.state]
        wrap = partial(mx.compile, inputs=self.state, outputs=self.state) if compile else _same
        self._shard = wrap(self._shard_impl)
        self._update = wrap(self._update_impl)
        self._add = mx.compile(_add_sums) if compile else _add_sums

    def _loss_of_params(self, params: dict, batch: BatchArrays) -> tuple[mx.array, mx.array]:
        if self.compute_dtype is not None:
            params = tree_map(lambda p: p.astype(self.compute_dtype), params)
        self.model.update(params)
        return loss_sum(self.model, batch)

    def _shard_impl(self, batch: BatchArrays) -> tuple[mx.array, mx.array, dict]:
        params = self.model.trainable_parameters()
        (total, count), grads = self._value_and_grad(params, batch)
        self.model.update(params)  # put the master weights back
        return total, count, grads

    def _update_impl(
        self, total: mx.array, count: mx.array, grads: dict
    ) -> tuple[mx.array, mx.array]:
        per_token = 1 / count  # the gradient of the mean loss is the summed one times this
        if self.world_size > 1:
            # average_gradients packs small arrays into few all-reduces; it divides by N, so
            # multiply by N / (global token count) to get the gradient of the global mean loss.
            grads = nn.average_gradients(grads, group=self.group)
            total = mx.distributed.all_sum(total, group=self.group)
            count = mx.distributed.all_sum(count, group=self.group)
            per_token = self.world_size / count
        # One scalar (1/count, times the clipping factor) multiplies the summed gradients inside
        # AdamW's fused update: scaling them first would write and re-read every gradient.
        norm = global_norm(grads) * per_token
        scale = per_token
        if self.grad_clip > 0:  # as optim.clip_grad_norm
            scale = scale * mx.minimum(self.grad_clip / (norm + 1e-6), 1.0)
        self.optimizer.update(self.model, tree_map(lambda g: g * scale.astype(g.dtype), grads))
        return total / count, norm

    def accumulate(self, batch: BatchArrays, acc: tuple | None = None) -> tuple:
        """Add one micro-batch's loss sum, token count and gradients to `acc` (not evaluated)."""
        for stream, shard in zip(self.streams, shards(batch, len(self.streams))):
            with mx.stream(stream):
                part = self._shard(shard)
            acc = part if acc is None else self._add(acc, part)
        return acc

    def step(self, batch: BatchArrays, acc: tuple | None = None) -> tuple[mx.array, mx.array]:
        """The last micro-batch plus the update: returns (mean loss, gradient norm), lazy."""
        return self._update(*self.accumulate(batch, acc))


def _add_sums(a: tuple, b: tuple) -> tuple:
    """(loss sum, token count, gradients) of two batches -> those of both."""
    return tree_map(mx.add, a, b)


def shards(batch: BatchArrays, n: int) -> list[BatchArrays]:
    """`batch` split along its rows into at most n near-equal parts (no empty ones). Losses are
    sums over tokens, so any split adds up to the whole batch's loss and gradients."""
    rows = batch[0].shape[0]
    n = max(1, min(n, rows))
    bounds = [rows * i // n for i in range(n + 1)]
    return [
        tuple(None if a is None else a[lo:hi] for a in batch) for lo, hi in zip(bounds, bounds[1:])
    ]


def global_norm(grads: dict) -> mx.array:
    return mx.sqrt(sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grads)))


def _same(fn):
    return fn


# -- memory ---------------------------------------------------------------------------------------


def step_memory(config, batch_size: int, length: int, precision: str, trainable: int) -> int:
    """A lower bound of the bytes one micro-batch of `batch_size` x `length` tokens needs to
    train, on top of the weights: the activations kept for the backward pass, the logits and
    their gradient (float32), the batch itself, and the gradients and AdamW moments.

    Counted per token: per layer, the residual and norm outputs, q/k/v, attention output,
    the MLP's hidden activations and one row of attention probabilities per head; then three
    vocabulary-sized float32 rows. Measured peaks are 2.3-3.3x this (2 to 6 layers, CPU),
    so a run refused by it could never have run.
    """
    D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * config.head_dim
    per_layer = 6 * D + 2 * kv + 3 * F + config.num_attention_heads * length
    act_bytes = 2 if precision in ("bfloat16", "bfloat16-pure") else 4
    per_token = config.num_hidden_layers * per_layer * act_bytes + 3 * V * 4 + 4 * 4
    state_bytes = 2 if precision == "bfloat16-pure" else 4
    return batch_size * length * per_token + 3 * trainable * state_bytes


def check_step_memory(
    config, batch_size: int, length: int, precision: str, trainable: int, have: int | None
) -> None:
    """Refuse a micro-batch that cannot fit in `have` bytes (None: unknown, allowed)."""
    need = step_memory(config, batch_size, length, precision, trainable)
    if have is None or need <= have:
        return
    fits = batch_size * have // need  # an upper bound: `need` is a lower one
    hint = (
        f"lower --batch-size (more than {fits} cannot fit; --grad-accumulation keeps the "
        "effective batch)"
        if fits
        else "use a smaller model or --context-length"
    )
    raise UserError(
        f"--batch-size {batch_size} at {length} tokens per sequence needs at least "
        f"{_gb(need)} of memory for one training step, and {_gb(have)} is available; {hint}"
    )


def _gb(n: int) -> str:
    if n >= 1e12:
        return f"{n / 1e12:,.1f} TB"
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def make_optimizer(args, params: dict) -> optim.Optimizer:
    """AdamW with the warmup-cosine schedule of `args` (a TrainingArgs), initialised on params."""
    schedule = lr_schedule(
        args.learning_rate, args.min_learning_rate, args.warmup_steps, args.total_decay_steps
    )
    optimizer = AdamW(
        learning_rate=schedule,
        betas=[args.beta1, args.beta2],
        eps=args.adam_eps,
        weight_decay=args.weight_decay,
        bias_correction=True,
    )
    optimizer.init(params)
    return optimizer
