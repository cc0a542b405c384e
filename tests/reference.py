"""A float64 numpy reference of the whole model, written from the paper's formulas.

Independent of `mlx_transformer.model` on purpose: tests compare the two. Shared by the ONNX tests.
"""

from __future__ import annotations

import math

import numpy as np

from mlx_transformer.config import ModelConfig


def sinusoidal(positions: np.ndarray, d: int) -> np.ndarray:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
    pe = np.zeros(positions.shape + (d,))
    for i in range(d // 2):
        angle = positions / 10000 ** (2 * i / d)
        pe[..., 2 * i] = np.sin(angle)
        pe[..., 2 * i + 1] = np.cos(angle)
    return pe


def rope_frequencies(cfg: ModelConfig) -> list[float]:
    """Angle per position of each feature pair: theta^(-2i/hd), then the scaling, pair by pair.

    linear: every frequency / factor. llama3 (Meta's Llama 3.1 reference): wavelengths 2π/f
    shorter than old_context / high_freq_factor are kept, longer than old_context /
    low_freq_factor divided by factor, and in between interpolated with
    s = (old_context / wavelength - low) / (high - low): (1 - s) f / factor + s f.
    """
    hd = cfg.head_dim
    freqs = [cfg.rope_theta ** (-2 * i / hd) for i in range(hd // 2)]
    scaling = cfg.rope_scaling
    if scaling is None:
        return freqs
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return [f / factor for f in freqs]
    assert scaling["rope_type"] == "llama3", scaling
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    out = []
    for f in freqs:
        wavelength = 2 * math.pi / f
        if wavelength < old_context / high:
            out.append(f)
        elif wavelength > old_context / low:
            out.append(f / factor)
        else:
            s = (old_context / wavelength - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return out


def rotate(
    x: np.ndarray, positions: np.ndarray, theta: float, traditional: bool, freqs=None
) -> np.ndarray:
    """Rotary encoding as explicit 2-D rotations of pairs of features.

    x: (B, H, L, hd); positions: (B, L). traditional pairs (2i, 2i+1); otherwise (i, i + hd/2).
    freqs: angle per position of each pair (`rope_frequencies`); default theta^(-2i/hd).
    """
    hd = x.shape[-1]
    out = x.copy()
    for i in range(hd // 2):
        f = theta ** (-2 * i / hd) if freqs is None else freqs[i]
        angle = positions[:, None, :] * f  # (B, 1, L)
        c, s = np.cos(angle), np.sin(angle)
        a, b = (2 * i, 2 * i + 1) if traditional else (i, i + hd // 2)
        out[..., a] = x[..., a] * c - x[..., b] * s
        out[..., b] = x[..., a] * s + x[..., b] * c
    return out


def rms(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def norm(cfg: ModelConfig, p: dict, name: str, x: np.ndarray) -> np.ndarray:
    if cfg.norm_type == "rmsnorm":
        return rms(x, p[f"{name}.weight"], cfg.norm_eps)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + cfg.norm_eps) * p[f"{name}.weight"] + p[f"{name}.bias"]


def linear(p: dict, name: str, x: np.ndarray) -> np.ndarray:
    y = x @ p[f"{name}.weight"].T
    return y + p[f"{name}.bias"] if f"{name}.bias" in p else y


def act(name: str, x: np.ndarray) -> np.ndarray:
    if name == "relu":
        return np.maximum(x, 0)
    if name == "gelu":
        return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    raise ValueError(name)


def attention(cfg, p, name, x, positions, mask):
    """mask: (B, L, L) boolean, True where query may attend to key."""
    B, L, _ = x.shape
    H, K, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = linear(p, f"{name}.q_proj", x).reshape(B, L, H, hd).transpose(0, 2, 1, 3)
    k = linear(p, f"{name}.k_proj", x).reshape(B, L, K, hd).transpose(0, 2, 1, 3)
    v = linear(p, f"{name}.v_proj", x).reshape(B, L, K, hd).transpose(0, 2, 1, 3)
    if cfg.qk_norm:  # RMSNorm of each head's features
        q = rms(q, p[f"{name}.q_norm.weight"], cfg.norm_eps)
        k = rms(k, p[f"{name}.k_norm.weight"], cfg.norm_eps)
    if cfg.position_encoding == "rope":
        freqs = rope_frequencies(cfg)
        q = rotate(q, positions, cfg.rope_theta, cfg.rope_traditional, freqs)
        k = rotate(k, positions, cfg.rope_theta, cfg.rope_traditional, freqs)
    k = np.repeat(k, H // K, axis=1)  # each key/value head serves H/K query heads
    v = np.repeat(v, H // K, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)  # (B, H, L, L)
    scores = np.where(mask[:, None], scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    w = np.exp(scores)
    w = w / w.sum(-1, keepdims=True)
    out = (w @ v).transpose(0, 2, 1, 3).reshape(B, L, H * hd)
    return linear(p, f"{name}.o_proj", out), w


def mlp(cfg, p, name, x):
    if cfg.hidden_act == "swiglu":
        g = linear(p, f"{name}.gate_proj", x)
        return linear(
            p, f"{name}.down_proj", g / (1 + np.exp(-g)) * linear(p, f"{name}.up_proj", x)
        )
    return linear(p, f"{name}.down_proj", act(cfg.hidden_act, linear(p, f"{name}.up_proj", x)))


def layer_windows(cfg: ModelConfig) -> list:
    """Each layer's sliding window (None: full attention), read from the config's fields."""
    types = cfg.layer_types or ["sliding_attention"] * cfg.num_hidden_layers
    return [cfg.sliding_window if t == "sliding_attention" else None for t in types]


def causal_mask(am: np.ndarray, positions: np.ndarray, window=None, sinks: int = 0) -> np.ndarray:
    """(B, L, L): query i sees real keys j <= i; with a window only those at positions
    i - window < j (or j < sinks). A padded query sees itself: no empty softmax rows."""
    L = am.shape[1]
    mask = np.tril(np.ones((L, L), bool))[None] & am[:, None, :]
    if window is not None:
        q, k = positions[:, :, None], positions[:, None, :]
        mask &= (q - k < window) | (k < sinks)
    return mask | np.eye(L, dtype=bool)[None]


def forward(cfg: ModelConfig, params: dict, ids: np.ndarray, attention_mask=None):
    """Logits (B, L, V) in float64 and the attention weights per layer, for a full sequence.

    attention_mask (B, L): 1 real, 0 padding. Positions count real tokens (padding: clamped at 0).
    """
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    B, L = ids.shape
    am = np.ones((B, L), bool) if attention_mask is None else np.asarray(attention_mask, bool)
    positions = np.maximum(np.cumsum(am, axis=1) - 1, 0)
    masks = {W: causal_mask(am, positions, W, cfg.attention_sinks) for W in layer_windows(cfg)}

    x = p["embed_tokens.weight"][ids]
    if cfg.scale_embeddings:
        x = x * math.sqrt(cfg.hidden_size)
    if cfg.position_encoding == "learned":
        x = x + p["embed_positions.weight"][positions]
    elif cfg.position_encoding == "sinusoidal":
        x = x + sinusoidal(positions, cfg.hidden_size)
    weights = []
    for i in range(cfg.num_hidden_layers):
        n = f"layers.{i}"
        mask = masks[layer_windows(cfg)[i]]
        if cfg.norm_position == "pre":
            h, w = attention(
                cfg, p, f"{n}.attn", norm(cfg, p, f"{n}.attn_norm", x), positions, mask
            )
            x = x + h
            x = x + mlp(cfg, p, f"{n}.mlp", norm(cfg, p, f"{n}.mlp_norm", x))
        else:
            h, w = attention(cfg, p, f"{n}.attn", x, positions, mask)
            x = norm(cfg, p, f"{n}.attn_norm", x + h)
            x = norm(cfg, p, f"{n}.mlp_norm", x + mlp(cfg, p, f"{n}.mlp", x))
        weights.append(w)
    if cfg.final_norm:
        x = norm(cfg, p, "norm", x)
    head = p["embed_tokens.weight"] if cfg.tie_word_embeddings else p["lm_head.weight"]
    return x @ head.T, weights
