"""Decoding a sliding-window model in constant memory: a compiled step over a ring buffer.

After a prefill into `RollingKVCache`s (time order, bounded), each layer's keys/values move into
fixed buffers: `sinks` slots for the first tokens and a ring of `window` slots, where the token
fed at column c goes to slot c mod window — over the one the window has just left. The model
builds the mask from each slot's position (-1: empty or padding), so the order of the slots does
not matter and every step has the same shapes: one `mx.compile`d function, as
`decode.StaticCacheDecoder` is for full attention. Positions keep counting, so a rotary model
decodes past `max_position_embeddings` with no re-prefill.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial

import mlx.core as mx

from ..model import Transformer
from ..rolling_cache import RollingKVCache
from .decode import trace_key


class RingKVCache(RollingKVCache):
    """One layer's ring buffers during a single decode step (one token per row)."""

    def __init__(self, window, sinks, keys, values, sink_keys, sink_values, slots, column):
        super().__init__(window, sinks)
        self.keys, self.values = keys, values  # (B, K, window, hd)
        self.sink_keys, self.sink_values = sink_keys, sink_values  # (B, K, sinks, hd)
        self.positions, self.sink_positions = slots  # (B, window), (B, sinks)
        self.slot = column % window  # scalar int32 array: where this step's token goes

    def begin(self, positions: mx.array) -> mx.array:
        self._chunk = positions  # (B, 1)
        self.positions = mx.slice_update(self.positions, positions, self.slot, axes=(1,))
        if not self.sinks:
            return self.positions
        self.sink_positions = mx.where(
            positions == mx.arange(self.sinks)[None], positions, self.sink_positions
        )
        ring = mx.where(self.positions < self.sinks, -1, self.positions)
        return mx.concatenate([self.sink_positions, ring], axis=1)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, keys, self.slot, axes=(2,))
        self.values = mx.slice_update(self.values, values, self.slot, axes=(2,))
        if not self.sinks:
            return self.keys, self.values
        is_sink = (self._chunk == mx.arange(self.sinks)[None])[:, None, :, None]  # (B,1,sinks,1)
        self.sink_keys = mx.where(is_sink, keys, self.sink_keys)
        self.sink_values = mx.where(is_sink, values, self.sink_values)
        return (
            mx.concatenate([self.sink_keys, self.keys], axis=2),
            mx.concatenate([self.sink_values, self.values], axis=2),
        )


def _ring_step(model_ref, window, sinks, tokens, positions, column, slots, buffers):
    """One decode step; `buffers` is per layer (keys, values, sink_keys, sink_values)."""
    caches = [RingKVCache(window, sinks, *b, slots, column) for b in buffers]
    logits = model_ref()(tokens, cache=caches, position_ids=positions)
    new_slots = (caches[0].positions, caches[0].sink_positions)
    new_buffers = [(c.keys, c.values, c.sink_keys, c.sink_values) for c in caches]
    return logits[:, -1], positions + 1, column + 1, new_slots, new_buffers


_COMPILED: dict[int, tuple[tuple, Callable]] = {}


def compiled_ring_step(model: Transformer) -> Callable:
    """The compiled `_ring_step` of this model, kept as `decode.compiled_step` keeps its own."""
    depends_on = trace_key(model)
    entry = _COMPILED.get(id(model))
    if entry is None or entry[0] != depends_on:
        if entry is None:
            weakref.finalize(model, _COMPILED.pop, id(model), None)
        c = model.config
        step = partial(_ring_step, weakref.ref(model), c.sliding_window, c.attention_sinks)
        entry = (depends_on, mx.compile(step))
        _COMPILED[id(model)] = entry
    return entry[1]


class RingCacheDecoder:
    """Decode steps of a model whose every layer slides, in buffers of sinks + window slots.

    Args:
        model: the model (`config.all_windowed`).
        cache: its `RollingKVCache`s after prefill (`make_cache(model, rolling=True)`).
        batch_size: B, used when nothing was prefilled.
        compiled: False runs the same step eagerly (for tests).
    """

    def __init__(
        self, model: Transformer, cache: list[RollingKVCache], batch_size=1, compiled=True
    ):
        c = model.config
        W, sinks, K, hd = c.sliding_window, c.attention_sinks, c.num_key_value_heads, c.head_dim
        dtype = model.embed_tokens.weight.dtype
        first = cache[0]
        B = first.keys.shape[0] if first.keys is not None else batch_size
        column = first.offset
        # Kept token i of R (the last R columns) goes to slot (column - R + i) mod W.
        R = first.keys.shape[2] if first.keys is not None else 0
        order = [(column - R + i) % W for i in range(R)]
        ring = mx.full((B, W), -1, mx.int32)
        if R:
            ring[:, order] = first.positions
        sink = first.sink_positions
        self.slots = (ring, sink if sink is not None else mx.full((B, sinks), -1, mx.int32))
        self.buffers = []
        for layer in cache:
            ring_k, ring_v = mx.zeros((B, K, W, hd), dtype), mx.zeros((B, K, W, hd), dtype)
            if R:
                ring_k[:, :, order] = layer.keys
                ring_v[:, :, order] = layer.values
            if layer.sink_keys is not None:
                sink_k, sink_v = layer.sink_keys, layer.sink_values
            else:
                sink_k, sink_v = (
                    mx.zeros((B, K, sinks, hd), dtype),
                    mx.zeros((B, K, sinks, hd), dtype),
                )
            self.buffers.append((ring_k, ring_v, sink_k, sink_v))
        start = first.next_position  # (B, 1), or 0 when nothing was prefilled
        self.positions = mx.broadcast_to(mx.array(start, mx.int32), (B, 1)).astype(mx.int32)
        self.column = mx.array(column, mx.int32)
        self.model = model
        step = partial(_ring_step, weakref.ref(model), W, sinks)
        self._step = compiled_ring_step(model) if compiled else step

    def __call__(self, tokens: mx.array) -> mx.array:
        """Feed tokens (B,) at the next position; return the next logits (B, V), lazily."""
        logits, self.positions, self.column, self.slots, self.buffers = self._step(
            tokens[:, None], self.positions, self.column, self.slots, self.buffers
        )
        return logits

    @property
    def cache_slots(self) -> int:
        """Key/value slots per layer and row: constant, however many tokens are decoded."""
        return self.buffers[0][0].shape[2] + self.buffers[0][2].shape[2]
