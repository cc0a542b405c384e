"""Sliding-window attention: its mask, and the same attention in blocks at O(L·W) cost.

A query at position i sees the keys at positions i - W < j <= i and the first `sinks` positions.
As a mask over all L x L scores (`window_mask`) it costs what full attention costs: MLX's fused
kernel has no block-sparse mode. `blocked_attention` computes the same thing in query blocks of
W: a block's keys are its own and the previous block's (every key a query can see is there),
plus the sinks, so scores take B·H·L·(2W + sinks) instead of B·H·L². The model uses it for a
whole sequence without a cache (training, evaluation) when L > 2W.

Positions come from the attention mask (-1: padding); rows with left or right padding keep
their real tokens contiguous, so a window over positions is one over columns too.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from . import ops


def window_mask(keys: mx.array, queries: mx.array, window: int, sinks: int = 0) -> mx.array:
    """Boolean (B, 1, L, S) local-attention mask from key positions (B, S) and query positions
    (B, L), -1 = padding: a query at i sees real keys at i - window < j <= i, and j < sinks.

    The queries are the last L keys. A padding query sees only itself (no empty softmax rows).
    """
    k, q = keys[:, None, :], queries[:, :, None]
    keep = (k >= 0) & (k <= q) & ((q - k < window) | (k < sinks))  # (B, L, S)
    L, S = queries.shape[1], keys.shape[1]
    own = mx.arange(S)[None] == mx.arange(S - L, S)[:, None]  # (L, S)
    return (keep | (own & (q < 0)))[:, None]


@dataclass
class WindowMask:
    """What a sliding-window layer is given instead of a mask: the positions it is made from."""

    keys: mx.array  # (B | 1, S) key positions, -1 = padding
    queries: mx.array  # (B | 1, L) query positions, -1 = padding
    window: int
    sinks: int = 0

    @property
    def dense(self) -> mx.array:
        """The (B, 1, L, S) boolean mask (built lazily: unused, it costs nothing)."""
        return window_mask(self.keys, self.queries, self.window, self.sinks)

    def blocks(self, L: int, S: int) -> bool:
        """Whether `blocked_attention` applies and saves work: no past, and L > 2W."""
        return L == S and L > 2 * self.window


def blocked_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: WindowMask, training: bool
) -> mx.array:
    """softmax(q kᵀ · scale + window mask) v in query blocks of W; q (B, H, L, hd), k and v
    (B, K, L, hd) of the same L tokens; returns (B, H, L, hd)."""
    B, H, L, hd = q.shape
    K, W, n_sinks = k.shape[1], mask.window, mask.sinks
    n = -(-L // W)  # blocks
    pad = n * W - L
    positions = mx.broadcast_to(mask.keys, (B, L))
    if pad:  # whole blocks: the padding is masked out like padding tokens
        q, k, v = (mx.pad(t, [(0, 0), (0, 0), (0, pad), (0, 0)]) for t in (q, k, v))
        positions = mx.pad(positions, [(0, 0), (0, pad)], constant_values=-1)

    def blocks(t: mx.array) -> mx.array:  # (B, heads, nW, hd) -> (B, n, heads, W, hd)
        return t.reshape(B, t.shape[1], n, W, hd).transpose(0, 2, 1, 3, 4)

    def with_previous(t: mx.array) -> mx.array:  # (B, n, K, W, hd) -> (B, n, K, 2W, hd)
        previous = mx.concatenate([mx.zeros_like(t[:, :1]), t[:, :-1]], axis=1)
        return mx.concatenate([previous, t], axis=3)

    qb = blocks(q).reshape(B * n, H, W, hd)
    kb, vb = with_previous(blocks(k)), with_previous(blocks(v))  # (B, n, K, 2W, hd)
    pos = positions.reshape(B, n, W)
    queries = pos.reshape(B * n, W)
    keys = mx.concatenate([mx.full((B, 1, W), -1, mx.int32), pos[:, :-1]], axis=1)
    keys = mx.concatenate([keys, pos], axis=2)  # (B, n, 2W)
    if n_sinks:  # every block also sees the sinks, once: as sinks, not again in its window
        sink_k, sink_v, sink_pos = gather_sinks(k, v, positions, n_sinks)
        kb = mx.concatenate([mx.broadcast_to(sink_k[:, None], (B, n, K, n_sinks, hd)), kb], 3)
        vb = mx.concatenate([mx.broadcast_to(sink_v[:, None], (B, n, K, n_sinks, hd)), vb], 3)
        keys = mx.where(keys < n_sinks, -1, keys)
        keys = mx.concatenate([mx.broadcast_to(sink_pos[:, None], (B, n, n_sinks)), keys], 2)
    S = kb.shape[3]
    block_mask = window_mask(keys.reshape(B * n, S), queries, W, n_sinks)
    out = ops.scaled_dot_product_attention(
        qb, kb.reshape(B * n, K, S, hd), vb.reshape(B * n, K, S, hd), scale, block_mask, training
    )
    out = out.reshape(B, n, H, W, hd).transpose(0, 2, 1, 3, 4).reshape(B, H, n * W, hd)
    return out[:, :, :L]


def gather_sinks(k: mx.array, v: mx.array, positions: mx.array, n: int):
    """Keys and values (B, K, n, hd) of each row's positions 0..n-1, and those positions (B, n)
    (-1 where a row has fewer real tokens)."""
    hit = positions[:, None, :] == mx.arange(n)[None, :, None]  # (B, n, L)
    index = mx.argmax(hit, axis=2)[:, None, :, None]  # (B, 1, n, 1)
    found = hit.any(axis=2)
    sink_pos = mx.where(found, mx.arange(n)[None], -1)
    return mx.take_along_axis(k, index, 2), mx.take_along_axis(v, index, 2), sink_pos
