"""The KV cache of a sliding-window layer: bounded memory however long the text grows.

A query at position i attends to keys at positions i - W < j <= i and to the first `sinks`
positions (StreamingLLM's attention sinks), so a layer never needs more than the last W - 1
tokens' keys plus the sinks'. `RollingKVCache` keeps exactly those, in time order: each chunk is
appended, what no later query can see is dropped. Positions keep counting (rotary models go past
`max_position_embeddings`), and each kept key's position is stored too (-1: padding), which is
what the model builds the mask from. mlx-lm's `RotatingKVCache` is the same idea in a ring buffer.

Padding may be on the left of the first chunk (batched prompts) or on the right of the last.
"""

from __future__ import annotations

import mlx.core as mx


class RollingKVCache:
    """Keys/values of the sinks and of the last `window - 1` tokens, with their positions.

    The model calls `begin(positions)` with the new chunk's positions (B, L) (-1 for padding)
    before the layers run, and gets the positions of the keys that `update_and_fetch` will return:
    [sinks, kept recent tokens, the new chunk] — the new chunk last, so a query's own key is at
    column S - L + i as in `KVCache`.
    """

    def __init__(self, window: int, sinks: int = 0):
        self.window, self.sinks = window, sinks
        self.offset = 0  # columns seen, padding included (what `KVCache.offset` counts)
        self.next_position: mx.array | int = 0  # (B, 1): real tokens seen per row
        self.keys: mx.array | None = None  # (B, K, R, hd): the recent tokens, R < window
        self.values: mx.array | None = None
        self.positions: mx.array | None = None  # (B, R) int32, -1 = padding
        self.sink_keys: mx.array | None = None  # (B, K, sinks, hd)
        self.sink_values: mx.array | None = None
        self.sink_positions: mx.array | None = None  # (B, sinks), -1 = not seen yet
        self._chunk: mx.array | None = None

    def begin(self, positions: mx.array) -> mx.array:
        """Take the next chunk's positions (B, L), -1 for padding; return the key positions
        (B, sinks + R + L) of what `update_and_fetch` returns, each sink counted once."""
        B, L = positions.shape
        positions = positions.astype(mx.int32)
        if self.positions is None:
            self.positions = mx.zeros((B, 0), mx.int32)
            self.sink_positions = mx.full((B, self.sinks), -1, mx.int32)
        self._chunk = positions
        self.next_position = self.next_position + (positions >= 0).sum(axis=1, keepdims=True)
        recent = mx.concatenate([self.positions, positions], axis=1)
        if not self.sinks:
            return recent
        seen = (positions[:, None, :] == mx.arange(self.sinks)[None, :, None]).any(axis=2)
        sinks = mx.where(seen, mx.arange(self.sinks)[None], self.sink_positions)
        # A sink in the recent part is attended to through the sink slots, not twice.
        return mx.concatenate([sinks, mx.where(recent < self.sinks, -1, recent)], axis=1)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append the chunk's (B, K, L, hd) keys/values (announced by `begin`); return the sinks,
        the kept tokens and the chunk, (B, K, sinks + R + L, hd); then drop the oldest."""
        positions, L = self._chunk, keys.shape[2]
        B, K, _, hd = keys.shape
        if self.keys is None:
            self.keys = mx.zeros((B, K, 0, hd), keys.dtype)
            self.values = mx.zeros((B, K, 0, hd), values.dtype)
            self.sink_keys = mx.zeros((B, K, self.sinks, hd), keys.dtype)
            self.sink_values = mx.zeros((B, K, self.sinks, hd), values.dtype)
        if self.sinks:
            self._catch_sinks(positions, keys, values)
        k = mx.concatenate([self.keys, keys], axis=2)
        v = mx.concatenate([self.values, values], axis=2)
        p = mx.concatenate([self.positions, positions], axis=1)
        start = max(0, k.shape[2] - (self.window - 1))  # a later query sees W - 1 earlier tokens
        self.keys, self.values, self.positions = k[:, :, start:], v[:, :, start:], p[:, start:]
        self.offset += L
        if self.sinks:
            k = mx.concatenate([self.sink_keys, k], axis=2)
            v = mx.concatenate([self.sink_values, v], axis=2)
        return k, v

    def _catch_sinks(self, positions: mx.array, keys: mx.array, values: mx.array) -> None:
        """Copy the chunk's tokens at positions < sinks into their sink slots."""
        hit = positions[:, None, :] == mx.arange(self.sinks)[None, :, None]  # (B, sinks, L)
        seen = hit.any(axis=2)
        index = mx.argmax(hit, axis=2)[:, None, :, None]  # (B, 1, sinks, 1)
        self.sink_keys = mx.where(
            seen[:, None, :, None], mx.take_along_axis(keys, index, axis=2), self.sink_keys
        )
        self.sink_values = mx.where(
            seen[:, None, :, None], mx.take_along_axis(values, index, axis=2), self.sink_values
        )
        self.sink_positions = mx.where(seen, mx.arange(self.sinks)[None], self.sink_positions)

    @property
    def state(self) -> tuple[mx.array | None, ...]:
        parts = (self.keys, self.values, self.positions, self.next_position)
        return parts + (self.sink_keys, self.sink_values, self.sink_positions)

    @property
    def size(self) -> int:
        """Key/value slots held now (bounded by sinks + window - 1)."""
        return (self.keys.shape[2] if self.keys is not None else 0) + self.sinks
