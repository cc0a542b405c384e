"""The decoder Transformer in one file: positions → attention → MLP → block → model → KV cache.

Read top to bottom. Attribute names are the safetensors keys (`ModelConfig.parameter_shapes()`
lists them); the ONNX builder in `export/` mirrors this file op for op. The ops that a platform
may run differently (linear layers, attention, activations) come from `ops`, which picks.

Shapes: B batch, L query length, S key length (past + L), D hidden size, H query heads,
K key/value heads, hd head size, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from . import ops
from .config import ModelConfig
from .local_attention import WindowMask, blocked_attention
from .ops import Linear
from .rolling_cache import RollingKVCache

# -- positions -----------------------------------------------------------------------------------


def sinusoidal_encoding(positions: mx.array, dims: int) -> mx.array:
    """The paper's PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).

    positions: integer array of any shape; returns float32 of shape positions.shape + (dims,).
    """
    inv_freq = mx.exp(-math.log(10000.0) * mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    angles = positions.astype(mx.float32)[..., None] * inv_freq  # (..., dims/2)
    return mx.stack([mx.sin(angles), mx.cos(angles)], axis=-1).reshape(*positions.shape, dims)


def positions_from_mask(attention_mask: mx.array, length: int) -> mx.array:
    """Position of each of the last `length` tokens: the count of real tokens before it.

    attention_mask: (B, S) with 1 for real tokens and 0 for padding, past included. Padding gets
    a clamped position; its outputs are never attended to by real tokens.
    """
    positions = mx.cumsum(attention_mask.astype(mx.int32), axis=1) - 1
    return mx.maximum(positions[:, -length:], 0)


def rope_offsets(positions: mx.array, attention_mask: mx.array | None) -> mx.array:
    """Per-row start position for `mx.fast.rope`, which rotates position offset + index.

    Real tokens of a row are contiguous within a chunk (left or right padding), so the offset is
    the first real token's position minus its index in the chunk.
    """
    if attention_mask is None:
        return positions[:, 0]
    L = positions.shape[1]
    real = attention_mask[:, -L:].astype(mx.int32)
    first = mx.argmax(real, axis=1)  # index of the first real token (0 if none)
    return mx.take_along_axis(positions, first[:, None], axis=1)[:, 0] - first.astype(mx.int32)


def apply_rope(
    x: mx.array,
    offset: mx.array | int,
    dims: int,
    theta: float,
    traditional: bool,
    freqs: mx.array | None = None,
) -> mx.array:
    """Rotate feature pairs of x (B, heads, L, hd) by angle position * theta^(-2i/hd).

    traditional pairs (2i, 2i+1); otherwise (i, i + hd/2), as Llama / Hugging Face do.
    offset: the position of the first token, an int or one per row (B,).
    freqs: 1 / frequency per pair (`ModelConfig.rope_frequencies`), replacing theta.
    """
    base = theta if freqs is None else None
    return mx.fast.rope(
        x, dims, traditional=traditional, base=base, scale=1.0, offset=offset, freqs=freqs
    )


def attention_mask_4d(attention_mask: mx.array | None, L: int, S: int) -> mx.array | str | None:
    """Boolean (B, 1, L, S) mask: causal (last query aligned with last key) and no padded keys.

    Each query also sees itself, so a padded query row is never fully masked (which would make
    NaNs that leak through V into real rows). Without padding, the fused kernel's "causal" is used.
    """
    if attention_mask is None:
        return "causal" if L > 1 else None
    q = mx.arange(S - L, S)[:, None]
    k = mx.arange(S)[None]
    causal = k <= q  # (L, S)
    keep = causal[None] & attention_mask[:, None, :].astype(mx.bool_)  # (B, L, S)
    keep = keep | (k == q)[None]
    return keep[:, None]


def key_positions(attention_mask: mx.array | None, S: int) -> mx.array:
    """Position of each of S keys, (B, S) or (1, S): the count of real tokens before it; -1 for
    padding."""
    if attention_mask is None:
        return mx.arange(S)[None]
    real = attention_mask.astype(mx.bool_)
    return mx.where(real, mx.cumsum(real.astype(mx.int32), axis=1) - 1, -1)


# -- attention -------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with grouped key/value heads (K == H: MHA, K == 1: MQA)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        D, bias = config.hidden_size, config.attention_bias
        self.q_proj = Linear(D, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(D, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(D, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, D, bias=config.attention_out_bias)
        self.qk_norm = config.qk_norm
        if self.qk_norm:  # Qwen3: RMSNorm over each head's query and key features
            self.q_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps)
        self.rope = config.position_encoding == "rope"
        self.rope_theta = config.rope_theta
        self.rope_traditional = config.rope_traditional
        # The angles the ONNX export uses too (scalings included); "_": not a parameter.
        if self.rope:
            self._rope_freqs = 1 / mx.array(config.rope_frequencies(), mx.float32)
        self.attention_dropout = config.attention_dropout
        self.dropout = nn.Dropout(config.attention_dropout)

    def __call__(
        self,
        x: mx.array,
        mask: mx.array | str | None = None,
        cache: KVCache | None = None,
        rope_offset: mx.array | int = 0,
        return_weights: bool = False,
    ) -> tuple[mx.array, mx.array | None]:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)  # (B, H, L, hd)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # (B, K, L, hd)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # (B, K, L, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            rope = (self.head_dim, self.rope_theta, self.rope_traditional, self._rope_freqs)
            q = apply_rope(q, rope_offset, *rope)
            k = apply_rope(k, rope_offset, *rope)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, K, S, hd)

        weights = None
        explicit = return_weights or (self.training and self.attention_dropout > 0)
        if isinstance(mask, WindowMask) and (explicit or not mask.blocks(L, k.shape[2])):
            mask = mask.dense
        if isinstance(mask, WindowMask):  # a long sequence through a window: O(L·W), in blocks
            out = blocked_attention(q, k, v, self.scale, mask, self.training)
        elif explicit:
            out, weights = self._explicit_attention(q, k, v, mask)
        else:
            out = ops.scaled_dot_product_attention(q, k, v, self.scale, mask, self.training)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)  # (B, L, H*hd)
        return self.o_proj(out), weights

    def _explicit_attention(self, q, k, v, mask) -> tuple[mx.array, mx.array]:
        """softmax(q kᵀ / √hd) v written out, for attention maps and attention dropout."""
        B, H, L, hd = q.shape
        S = k.shape[2]
        # Group query heads by the key/value head they share: (B, K, H/K, L, hd).
        qg = q.reshape(B, self.n_kv_heads, H // self.n_kv_heads, L, hd)
        scores = (qg * self.scale) @ k[:, :, None].swapaxes(-1, -2)  # (B, K, H/K, L, S)
        scores = scores.reshape(B, H, L, S).astype(mx.float32)
        if isinstance(mask, str):
            mask = mx.arange(S)[None] <= mx.arange(S - L, S)[:, None]
        if mask is not None:
            scores = mx.where(mask, scores, -mx.inf)
        weights = mx.softmax(scores, axis=-1).astype(q.dtype)  # (B, H, L, S)
        dropped = self.dropout(weights).reshape(B, self.n_kv_heads, H // self.n_kv_heads, L, S)
        out = (dropped @ v[:, :, None]).reshape(B, H, L, hd)
        return out, weights


# -- feed-forward ----------------------------------------------------------------------------------


def activation(name: str):
    """The MLP nonlinearity (SwiGLU: its gate's SiLU); GELU-tanh is GPT-2's "gelu_new"."""
    return {"relu": nn.relu, "gelu": nn.gelu, "gelu_tanh": ops.gelu_tanh, "swiglu": ops.silu}[name]


class MLP(nn.Module):
    """Position-wise feed-forward: down(act(up(x))), or down(silu(gate(x)) * up(x)) for SwiGLU."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        D, F, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.swiglu = config.hidden_act == "swiglu"
        self.act = activation(config.hidden_act)
        if self.swiglu:
            self.gate_proj = Linear(D, F, bias=bias)
        self.up_proj = Linear(D, F, bias=bias)
        self.down_proj = Linear(F, D, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        if self.swiglu:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


# -- block -----------------------------------------------------------------------------------------


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class Block(nn.Module):
    """Attention then MLP, each in a residual connection with a norm before (pre) or after (post).

    pre:  x = x + attn(norm(x));  x = x + mlp(norm(x))      (GPT-2, Llama; trains more stably)
    post: x = norm(x + attn(x));  x = norm(x + mlp(x))      (the original paper)
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.residual_dropout)

    def __call__(self, x, mask=None, cache=None, rope_offset=0, return_weights=False):
        if self.pre_norm:
            h, weights = self.attn(self.attn_norm(x), mask, cache, rope_offset, return_weights)
            x = x + self.dropout(h)
            x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        else:
            h, weights = self.attn(x, mask, cache, rope_offset, return_weights)
            x = self.attn_norm(x + self.dropout(h))
            x = self.mlp_norm(x + self.dropout(self.mlp(x)))
        return x, weights


# -- model -----------------------------------------------------------------------------------------


@dataclass
class ModelOutput:
    """What `Transformer.forward` returns when asked for more than logits."""

    logits: mx.array  # (B, L, V)
    hidden_states: list[mx.array] | None = (
        None  # residual stream: embeddings, then after each block
    )
    attentions: list[mx.array] | None = None  # per block, (B, H, L, S); rows sum to 1


class Transformer(nn.Module):
    """Token embedding + positions → N blocks → final norm (pre-norm only) → LM head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, D)
        if config.position_encoding == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, D)
        self.embed_scale = math.sqrt(D) if config.scale_embeddings else 1.0
        self.dropout = nn.Dropout(config.embedding_dropout)
        self.layers = [Block(config) for _ in range(config.num_hidden_layers)]
        if config.final_norm:
            self.norm = make_norm(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(D, config.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2 init: N(0, std) weights, zero biases, unit norms; residual outputs scaled down."""
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        normal = nn.init.normal(0.0, std)

        def init(path: str, p: mx.array) -> mx.array:
            if path.endswith("norm.weight"):
                return mx.ones_like(p)
            if path.endswith(".bias"):
                return mx.zeros_like(p)
            if path.endswith(("o_proj.weight", "down_proj.weight")):
                return nn.init.normal(0.0, residual_std)(p)
            return normal(p)

        params = [(k, init(k, v)) for k, v in tree_flatten(self.parameters())]
        self.update(tree_unflatten(params))

    def __call__(
        self,
        input_ids: mx.array,
        attention_mask: mx.array | None = None,
        cache: list[KVCache] | None = None,
        position_ids: mx.array | None = None,
    ) -> mx.array:
        """Logits (B, L, V) for input_ids (B, L).

        Args:
            input_ids: token ids, (B, L).
            attention_mask: (B, past + L), 1 = real token, 0 = padding (left or right).
            cache: one KVCache per layer (`make_cache`), updated in place; None = no past.
            position_ids: (B, L); by default derived from the mask and the cache offset.
        """
        return self.forward(input_ids, attention_mask, cache, position_ids).logits

    def forward(
        self,
        input_ids: mx.array,
        attention_mask: mx.array | None = None,
        cache: list[KVCache] | None = None,
        position_ids: mx.array | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> ModelOutput:
        """Like `__call__`, optionally also returning the residual stream and attention weights."""
        B, L = input_ids.shape
        offset = cache[0].offset if cache is not None else 0
        S = offset + L
        rolling = cache is not None and all(isinstance(c, RollingKVCache) for c in cache)
        unbounded = rolling and self.config.position_encoding in ("rope", "none")
        if S > self.config.max_position_embeddings and not unbounded:
            raise ValueError(
                f"sequence of {S} tokens exceeds the model's context of "
                f"{self.config.max_position_embeddings} (max_position_embeddings)"
            )
        if attention_mask is not None and attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected {(B, S)}")
        if position_ids is None:
            if attention_mask is None:
                start = cache[0].next_position if rolling else offset  # (B, 1) or int
                position_ids = mx.broadcast_to(start + mx.arange(L)[None], (B, L))
            else:
                position_ids = positions_from_mask(attention_mask, L)

        x = self.embed_tokens(input_ids) * self.embed_scale  # (B, L, D)
        pe = self.config.position_encoding
        if pe == "learned":
            x = x + self.embed_positions(position_ids)
        elif pe == "sinusoidal":
            x = x + sinusoidal_encoding(position_ids, self.config.hidden_size).astype(x.dtype)
        x = self.dropout(x)

        masks = self.layer_masks(attention_mask, L, S, cache, position_ids)
        rope_offset = rope_offsets(position_ids, attention_mask) if pe == "rope" else 0
        hidden_states = [x] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for i, layer in enumerate(self.layers):
            layer_cache = cache[i] if cache is not None else None
            mask = masks[self.config.layer_window(i)]
            x, weights = layer(x, mask, layer_cache, rope_offset, output_attentions)
            if output_hidden_states:
                hidden_states.append(x)
            if output_attentions:
                attentions.append(weights)
        return ModelOutput(self.logits_from_hidden(x), hidden_states, attentions)

    def layer_masks(self, attention_mask, L, S, cache, position_ids) -> dict:
        """The attention mask of each kind of layer, by window (None: full attention)."""
        masks = {None: attention_mask_4d(attention_mask, L, S)}
        W, sinks = self.config.sliding_window, self.config.attention_sinks
        if not self.config.windowed:
            return masks
        rolling = [c for c in cache or () if isinstance(c, RollingKVCache)]
        if rolling:  # the cache keeps only what the window can see, and knows its positions
            real = attention_mask[:, -L:] if attention_mask is not None else None
            chunk = position_ids if real is None else mx.where(real > 0, position_ids, -1)
            keys, queries = [c.begin(chunk) for c in rolling][0], chunk
        else:
            keys = key_positions(attention_mask, S)
            queries = keys[:, -L:]
        masks[W] = WindowMask(keys, queries, W, sinks)  # the layer picks dense or blocked
        return masks

    def logits_from_hidden(self, x: mx.array) -> mx.array:
        """Final norm and LM head (also what the logit lens applies to intermediate layers)."""
        if self.config.final_norm:
            x = self.norm(x)
        if self.config.tie_word_embeddings:
            return ops.tied_linear(x, self.embed_tokens.weight, self.training)
        return self.lm_head(x)


# -- KV cache --------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of the past, grown in steps so decoding rarely reallocates (mlx-lm style)."""

    step = 256

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, K, L, hd) keys/values; return all of them so far, (B, K, offset + L, hd)."""
        prev, L = self.offset, keys.shape[2]
        if self.keys is None or prev + L > self.keys.shape[2]:
            B, K, _, hd = keys.shape
            n = self.step * ((prev + L + self.step - 1) // self.step)
            new_k = mx.zeros((B, K, n, hd), keys.dtype)
            new_v = mx.zeros((B, K, n, hd), values.dtype)
            if self.keys is not None:
                new_k[..., :prev, :] = self.keys[..., :prev, :]
                new_v[..., :prev, :] = self.values[..., :prev, :]
            self.keys, self.values = new_k, new_v
        self.offset += L
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def state(self) -> tuple[mx.array | None, mx.array | None]:
        return self.keys, self.values


def make_cache(model: Transformer, rolling: bool = False) -> list[KVCache | RollingKVCache]:
    """One empty cache per layer; `rolling`: a bounded `RollingKVCache` for each sliding-window
    layer (full-attention layers keep a growing `KVCache`)."""
    c = model.config
    return [
        RollingKVCache(W, c.attention_sinks)
        if rolling and (W := c.layer_window(i)) is not None
        else KVCache()
        for i in range(len(model.layers))
    ]
