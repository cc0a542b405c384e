"""The token engine under generate.py: chunked prefill, then one decode step per new token.

Two decoders produce identical logits:

- `StaticCacheDecoder` (default): keys/values live in preallocated (B, K, N, hd) buffers and each
  step has the same shapes, so the whole step (model forward included) is one `mx.compile`d
  function. On a CPU, decode of a small model is bound by per-op dispatch and Python graph
  building; compiling fuses the elementwise ops and skips the Python, ~1.2-1.3x faster.
- `DynamicCacheDecoder`: the model's own growing `KVCache`, uncompiled (mlx-lm's approach); kept
  as the reference the compiled path is tested against, and as `compiled=False`.

How the static buffers fit the unchanged `Transformer.forward`: the buffer's last slot N-1 is a
scratch slot that always holds the current token's key/value, and past tokens sit at their
column index. The model is told the cache offset is N-1 (so it expects a mask over N keys and
treats slot N-1 as "self"); the mask we pass marks the written past slots (minus left padding)
and the scratch slot. The current token is also written at its own column p, masked out this step
and visible from the next one on. Positions are passed explicitly.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from functools import partial

import mlx.core as mx
from mlx.utils import tree_flatten

from .. import ops
from ..model import KVCache, Transformer, make_cache
from .rules import available_memory


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[mx.array, mx.array | None]:
    """Prompts of different lengths as one (B, L) batch, padding on the left.

    The numpy side (ONNX runtime, verify) is `export.session.left_pad`.
    Returns:
        (input_ids (B, L) int32, attention_mask (B, L) int32, or None when nothing is padded).
    """
    L = max(len(p) for p in prompts)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    ids = [[pad_id] * (L - len(p)) + list(p) for p in prompts]
    if all(len(p) == L for p in prompts):
        return mx.array(ids, mx.int32), None
    mask = [[0] * (L - len(p)) + [1] * len(p) for p in prompts]
    return mx.array(ids, mx.int32), mx.array(mask, mx.int32)


def prefill(
    model: Transformer,
    input_ids: mx.array,
    attention_mask: mx.array | None,
    step_size: int = 512,
    rolling: bool = False,
) -> list[KVCache]:
    """Fill a fresh cache with `input_ids` (B, L), `step_size` tokens per forward pass.

    Call it with all prompt tokens but the last, which the decoder then feeds: only the cache is
    evaluated here, so MLX skips what the cache does not need (the last block's attention
    output and MLP, the final norm and LM head) — a quarter of the work for a 4-layer model.
    `rolling`: bounded caches for the sliding-window layers (`make_cache`).
    """
    cache = make_cache(model, rolling)
    L = input_ids.shape[1]
    for start in range(0, L, step_size):
        end = min(start + step_size, L)
        mask = attention_mask[:, :end] if attention_mask is not None else None
        model(input_ids[:, start:end], mask, cache)
        mx.eval([c.state for c in cache])
    return cache


class StaticKVCache:
    """One layer's view of the preallocated buffers during a single compiled decode step."""

    def __init__(self, keys: mx.array, values: mx.array, column: mx.array):
        self.keys, self.values = keys, values  # (B, K, N, hd)
        self.column = column  # scalar int32: where the current token is kept for later steps
        self.offset = keys.shape[2] - 1  # what the model reads: "N - 1 keys of past"

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, keys, self.column, axes=(2,))
        self.values = mx.slice_update(self.values, values, self.column, axes=(2,))
        self.keys[..., -1:, :] = keys  # scratch slot: the current token attends to itself here
        self.values[..., -1:, :] = values
        return self.keys, self.values


def _static_step(model_ref, tokens, positions, column, key_valid, scratch, keys, values):
    """One decode step over the static buffers; `model_ref` is a weak reference to the model.

    `scratch` (N,) marks the last slot. It is an input rather than `arange(N) == N - 1` because
    MLX's CPU compiler builds (with a C++ compiler, ~1 s) a kernel per distinct constant: N as a
    constant would cost that again for every new prompt + max_tokens.
    """
    caches = [StaticKVCache(k, v, column) for k, v in zip(keys, values)]
    slots = mx.arange(key_valid.shape[1])
    mask = ((slots < column) & key_valid) | scratch  # (B, N)
    logits = model_ref()(tokens, attention_mask=mask, cache=caches, position_ids=positions)
    new_keys = [c.keys for c in caches]
    new_values = [c.values for c in caches]
    return logits[:, -1], positions + 1, column + 1, new_keys, new_values


# id(model) -> (what the trace depends on, the compiled step). The step holds the model weakly, and
# the entry goes when the model does. The trace captures the weights as constants, so new weight
# arrays (training, `model.update`) or a train/eval switch make a new entry.
_COMPILED: dict[int, tuple[tuple, Callable]] = {}


def trace_key(model: Transformer) -> tuple:
    """What a compiled step of `model` depends on: a new value means a new trace."""
    # The trace also fixes the device and which ops `ops` picked (CPU kernels or MLX's).
    choices = (model.training, str(mx.default_device()), ops.cpu_kernels())
    return (*choices, *(id(p) for _, p in tree_flatten(model.parameters())))


def compiled_step(model: Transformer) -> Callable:
    """The compiled `_static_step` of this model, reused across generations (MLX retraces it
    only for new shapes), so a second generation does not pay the ~10 ms trace again."""
    depends_on = trace_key(model)
    entry = _COMPILED.get(id(model))
    if entry is None or entry[0] != depends_on:
        if entry is None:
            weakref.finalize(model, _COMPILED.pop, id(model), None)
        entry = (depends_on, mx.compile(partial(_static_step, weakref.ref(model))))
        _COMPILED[id(model)] = entry
    return entry[1]


class StaticCacheDecoder:
    """Decode steps over buffers of N slots (N - 1 columns of past + scratch), compiled.

    The buffers start at the prompt plus `grow_by` slots and grow by `grow_by` (a copy and one
    new trace each time) up to `capacity`: each step attends over every slot of the buffers,
    so buffers sized for max_tokens from the start cost a batch-8 step up to ~40% more while
    they are mostly empty.

    Args:
        model: the model.
        cache: the cache after prefill (its `offset` L may be 0).
        attention_mask: the prefill mask (B, L), or None when the prompts were not padded.
        capacity: N at most; N - 1 - L steps can run, and N <= the model's context.
        batch_size: B, when attention_mask is None.
        compiled: False runs the same step eagerly (for tests).
        grow_by: slots added at a time.
    """

    def __init__(
        self,
        model: Transformer,
        cache: list[KVCache],
        attention_mask: mx.array | None,
        capacity: int,
        batch_size: int = 1,
        compiled: bool = True,
        grow_by: int = 128,
    ):
        L, config = cache[0].offset, model.config
        N = min(capacity, L + grow_by)
        B = attention_mask.shape[0] if attention_mask is not None else batch_size
        K, hd = config.num_key_value_heads, config.head_dim
        dtype = model.embed_tokens.weight.dtype
        self.keys, self.values = [], []
        for c in cache:
            k = mx.zeros((B, K, N, hd), dtype)
            v = mx.zeros((B, K, N, hd), dtype)
            if L:
                k[..., :L, :] = c.keys[..., :L, :]
                v[..., :L, :] = c.values[..., :L, :]
            self.keys.append(k)
            self.values.append(v)
        real = attention_mask if attention_mask is not None else mx.ones((B, L), mx.int32)
        self.key_valid = mx.concatenate([real, mx.ones((B, N - L), mx.int32)], axis=1) > 0
        self.positions = real.sum(axis=1, keepdims=True).astype(mx.int32)  # (B, 1)
        self.column = mx.array(L, mx.int32)
        self.scratch = mx.arange(N) == N - 1
        self.model = model  # the steps hold it weakly
        self._step = compiled_step(model) if compiled else partial(_static_step, weakref.ref(model))
        self._next_column, self.capacity, self.grow_by = L, capacity, grow_by

    def _grow(self) -> None:
        """Move the past into buffers `grow_by` slots longer (at most `capacity`)."""
        B, K, N, hd = self.keys[0].shape
        M = min(self.capacity, N + self.grow_by)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = mx.zeros((B, K, M, hd), old.dtype)
                new[..., : N - 1, :] = old[..., : N - 1, :]  # slot N - 1 was the scratch slot
                buffers[i] = new
        fresh = mx.ones((B, M - N + 1), mx.bool_)
        self.key_valid = mx.concatenate([self.key_valid[:, : N - 1], fresh], axis=1)
        self.scratch = mx.arange(M) == M - 1

    def __call__(self, tokens: mx.array) -> mx.array:
        """Feed tokens (B,) at the next position; return the next logits (B, V), lazily."""
        if self._next_column == self.keys[0].shape[2] - 1:  # it would land on the scratch slot
            self._grow()
        self._next_column += 1
        logits, self.positions, self.column, self.keys, self.values = self._step(
            tokens[:, None],
            self.positions,
            self.column,
            self.key_valid,
            self.scratch,
            self.keys,
            self.values,
        )
        return logits


class DynamicCacheDecoder:
    """Decode steps with the model's growing KVCache, uncompiled (the reference path)."""

    def __init__(self, model: Transformer, cache: list[KVCache], attention_mask: mx.array | None):
        self.model, self.cache, self.attention_mask = model, cache, attention_mask

    def __call__(self, tokens: mx.array) -> mx.array:
        mask = self.attention_mask
        if mask is not None:
            mask = mx.concatenate([mask, mx.ones((mask.shape[0], 1), mask.dtype)], axis=1)
            self.attention_mask = mask
        return self.model(tokens[:, None], attention_mask=mask, cache=self.cache)[:, -1]


def device_memory_available() -> int | None:
    """Bytes the device running MLX can still allocate, or None if unknown (training's step and
    generation's KV cache are checked against it before they allocate)."""
    if mx.default_device() == mx.gpu:
        info = mx.device_info()
        if "free_memory" in info:  # CUDA: the device's own memory
            return int(info["free_memory"])
        size = info.get("max_recommended_working_set_size") or info.get("memory_size")
        if size:  # Metal: a share of the memory it shares with the system
            return max(0, int(size) - mx.get_active_memory())
    return available_memory()
