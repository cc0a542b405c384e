"""Subgraphs of one decoder block, mirroring `mlx_transformer/model.py` op for op.

Every function takes the graph, the names of its input values and the checkpoint key it reads,
and returns the names of its output values. `flavour` is "portable" (standard ONNX, opset 17)
or "ort" (onnxruntime's com.microsoft fused ops where they express the model exactly).

Shapes: B batch, L new tokens, P past length, S = P + L, D hidden, H query heads, K key/value
heads, G = H / K, hd head size.
"""

from __future__ import annotations

import math

import numpy as np

from mlx_transformer.config import ModelConfig

from .graph import MS_DOMAIN, Graph

# Masked attention scores: the most negative float32, so exp() gives exactly 0 without any -inf
# arithmetic. Each query row keeps at least its own key, so no row is all masked (no NaN).
MASKED = float(np.finfo(np.float32).min)


def node_path(key: str) -> str:
    """`layers.0.attn.q_proj` → `/model/layers.0/attn/q_proj` (node names point at weights)."""
    parts: list[str] = []
    for part in key.split("."):
        if part.isdigit() and parts:
            parts[-1] += f".{part}"
        else:
            parts.append(part)
    return "/model/" + "/".join(parts)


# -- linear and norms ------------------------------------------------------------------------------

#   x ─MatMul(key.weight.T)─Add(key.bias)─▶ y        (nn.Linear: y = x Wᵀ + b)


def linear(g: Graph, x: str, key: str, bias: bool) -> str:
    path = node_path(key)
    y = g.node("MatMul", [x, g.weight(f"{key}.weight", transpose=True)], f"{path}/MatMul")
    if bias:
        y = g.node("Add", [y, g.weight(f"{key}.bias")], f"{path}/Add")
    return y


#   x ─Mul(x)─ReduceMean(-1)─Add(eps)─Sqrt─┐
#   x ─────────────────────────────────────Div─Mul(weight)─▶     (RMSNorm, explicit at opset 17)


def rms_norm(g: Graph, x: str, key: str, eps: float) -> str:
    path = node_path(key)
    square = g.node("Mul", [x, x], f"{path}/Pow")
    mean = g.node("ReduceMean", [square], f"{path}/ReduceMean", axes=[-1], keepdims=1)
    var = g.node("Add", [mean, g.constant(eps)], f"{path}/AddEps")
    rms = g.node("Sqrt", [var], f"{path}/Sqrt")
    y = g.node("Div", [x, rms], f"{path}/Div")
    return g.node("Mul", [y, g.weight(f"{key}.weight")], f"{path}/Mul")


def norm(g: Graph, x: str, key: str, config: ModelConfig) -> str:
    """LayerNorm (one standard op, statistics in float32) or RMSNorm (explicit ops)."""
    if config.norm_type == "rmsnorm":
        return rms_norm(g, x, key, config.norm_eps)
    inputs = [x, g.weight(f"{key}.weight"), g.weight(f"{key}.bias")]
    path = node_path(key)
    return g.node(
        "LayerNormalization",
        inputs,
        f"{path}/LayerNorm",
        axis=-1,
        epsilon=config.norm_eps,
        stash_type=1,
    )


#   portable:  residual ─Add(h)─▶ sum ─norm─▶ normed
#   ort:       h, residual ─Skip[Simplified]LayerNormalization─▶ normed (output 0), sum (output 3)


def add_and_norm(
    g: Graph, residual: str, h: str | None, key: str, config: ModelConfig, flavour: str
) -> tuple[str, str]:
    """norm(residual + h) and residual + h; with h None just norm(residual) and residual."""
    if h is None:
        return norm(g, residual, key, config), residual
    path = node_path(key)
    if flavour == "ort":
        rms = config.norm_type == "rmsnorm"
        op = "SkipSimplifiedLayerNormalization" if rms else "SkipLayerNormalization"
        inputs = [h, residual, g.weight(f"{key}.weight")]
        if not rms:
            inputs.append(g.weight(f"{key}.bias"))
        normed, _, _, total = g.node(
            op,
            inputs,
            f"{path}/{op}",
            domain=MS_DOMAIN,
            outputs=[True, False, False, True],
            epsilon=config.norm_eps,
        )
        return normed, total
    total = g.node("Add", [residual, h], f"{path}/ResidualAdd")
    return norm(g, total, key, config), total


# -- feed-forward ----------------------------------------------------------------------------------

#   gelu:       x ─Div(√2)─Erf─Add(1)─Mul(x)─Div(2)─▶                 (ort: com.microsoft Gelu)
#   gelu_tanh:  x ─Pow(3)─Mul(0.044715)─Add(x)─Mul(√(2/π))─Tanh─Add(1)─Mul(0.5·x)─▶  (FastGelu)
#   swiglu:     x ─gate─Sigmoid─Mul(gate)─Mul(up(x))─down─▶


def activation(g: Graph, x: str, name: str, path: str, flavour: str) -> str:
    if name == "relu":
        return g.node("Relu", [x], f"{path}/Relu")
    if flavour == "ort":
        op = "Gelu" if name == "gelu" else "FastGelu"
        return g.node(op, [x], f"{path}/{op}", domain=MS_DOMAIN)
    if name == "gelu":
        scaled = g.node("Div", [x, g.constant(math.sqrt(2.0))], f"{path}/Div")
        erf = g.node("Erf", [scaled], f"{path}/Erf")
        one_plus = g.node("Add", [erf, g.constant(1.0)], f"{path}/Add")
        y = g.node("Mul", [x, one_plus], f"{path}/Mul")
        return g.node("Div", [y, g.constant(2.0)], f"{path}/Half")
    cube = g.node("Pow", [x, g.constant(3.0)], f"{path}/Pow")
    inner = g.node("Mul", [cube, g.constant(0.044715)], f"{path}/MulCube")
    inner = g.node("Add", [x, inner], f"{path}/AddX")
    inner = g.node("Mul", [inner, g.constant(math.sqrt(2.0 / math.pi))], f"{path}/MulC")
    tanh = g.node("Tanh", [inner], f"{path}/Tanh")
    one_plus = g.node("Add", [tanh, g.constant(1.0)], f"{path}/Add")
    half_x = g.node("Mul", [x, g.constant(0.5)], f"{path}/HalfX")
    return g.node("Mul", [half_x, one_plus], f"{path}/Mul")


def mlp(g: Graph, x: str, key: str, config: ModelConfig, flavour: str) -> str:
    bias = config.mlp_bias
    up = linear(g, x, f"{key}.up_proj", bias)
    if config.hidden_act == "swiglu":
        gate = linear(g, x, f"{key}.gate_proj", bias)
        path = node_path(key)
        silu = g.node("Mul", [gate, g.node("Sigmoid", [gate], f"{path}/Sigmoid")], f"{path}/Silu")
        hidden = g.node("Mul", [silu, up], f"{path}/GateMul")
    else:
        hidden = activation(g, up, config.hidden_act, node_path(key) + "/act", flavour)
    return linear(g, hidden, f"{key}.down_proj", bias)


# -- rotary ---------------------------------------------------------------------------------------

#   halves:       x ─Split─ x1, x2 ─▶ Concat(x1·cos − x2·sin, x1·sin + x2·cos)
#   traditional:  x ─Reshape(…, hd/2, 2)─Split─ xe, xo ─▶ Concat(xe·cos − xo·sin, xe·sin + xo·cos)
#                   ─Reshape(…, hd)─▶


def rotate(g: Graph, x: str, cos: str, sin: str, hd: int, traditional: bool, path: str) -> str:
    """Rotate (B, h, L, hd) by cos/sin tables (B, 1, L, hd/2), or (…, hd/2, 1) if traditional."""
    half = hd // 2
    if traditional:
        pairs = g.node("Reshape", [x, g.constant([0, 0, 0, half, 2], np.int64)], f"{path}/Pairs")
        a, b = g.node(
            "Split", [pairs, g.constant([1, 1], np.int64)], f"{path}/Split", outputs=2, axis=-1
        )
    else:
        a, b = g.node(
            "Split", [x, g.constant([half, half], np.int64)], f"{path}/Split", outputs=2, axis=-1
        )
    a_cos = g.node("Mul", [a, cos], f"{path}/MulACos")
    b_sin = g.node("Mul", [b, sin], f"{path}/MulBSin")
    a_sin = g.node("Mul", [a, sin], f"{path}/MulASin")
    b_cos = g.node("Mul", [b, cos], f"{path}/MulBCos")
    first = g.node("Sub", [a_cos, b_sin], f"{path}/Sub")
    second = g.node("Add", [a_sin, b_cos], f"{path}/Add")
    y = g.node("Concat", [first, second], f"{path}/Concat", axis=-1)
    if traditional:
        y = g.node("Reshape", [y, g.constant([0, 0, 0, hd], np.int64)], f"{path}/Unpair")
    return y


# -- attention ------------------------------------------------------------------------------------


def split_heads(g: Graph, x: str, heads: int, hd: int, path: str) -> str:
    """(B, L, heads·hd) → (B, heads, L, hd)."""
    x = g.node("Reshape", [x, g.constant([0, 0, heads, hd], np.int64)], f"{path}/Reshape")
    return g.node("Transpose", [x], f"{path}/Transpose", perm=[0, 2, 1, 3])


#   q ─Mul(scale)─Reshape(B,K,G,L,hd)─┐
#   k_all ─Unsqueeze(2)─Transpose─────MatMul─Where(keep, ·, MASKED)─Softmax─┐
#   v_all ─Unsqueeze(2)─────────────────────────────────────────────────────MatMul─▶ (B,K,G,L,hd)
#   (G == 1: the same in 4-D without the group axis)


def scaled_dot_product(
    g: Graph, q: str, k: str, v: str, keep: str, config: ModelConfig, path: str
) -> str:
    """softmax(q kᵀ/√hd, masked) v for q (B, H, L, hd), k/v (B, K, S, hd) → (B, L, H·hd)."""
    H, K, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = g.node("Mul", [q, g.constant(hd**-0.5)], f"{path}/Scale")
    if H != K:  # group the query heads by the key/value head they share
        q = g.node("Reshape", [q, g.constant([0, K, H // K, -1, hd], np.int64)], f"{path}/GroupQ")
        k = g.node("Unsqueeze", [k, g.constant([2], np.int64)], f"{path}/GroupK")
        v = g.node("Unsqueeze", [v, g.constant([2], np.int64)], f"{path}/GroupV")
    perm = [0, 1, 3, 2] if H == K else [0, 1, 2, 4, 3]
    kt = g.node("Transpose", [k], f"{path}/TransposeK", perm=perm)
    scores = g.node("MatMul", [q, kt], f"{path}/QK/MatMul")
    scores = g.node("Where", [keep, scores, g.constant(MASKED)], f"{path}/Mask")
    weights = g.node("Softmax", [scores], f"{path}/Softmax", axis=-1)
    out = g.node("MatMul", [weights, v], f"{path}/AV/MatMul")
    if H != K:
        out = g.node("Reshape", [out, g.constant([0, H, -1, hd], np.int64)], f"{path}/Ungroup")
    out = g.node("Transpose", [out], f"{path}/TransposeOut", perm=[0, 2, 1, 3])
    return g.node("Reshape", [out, g.constant([0, 0, H * hd], np.int64)], f"{path}/Merge")


def attention_portable(
    g: Graph,
    x: str,
    key: str,
    config: ModelConfig,
    rotary: tuple[str, str] | None,
    keep: str,
    past: tuple[str, str],
) -> tuple[str, str, str]:
    """Self-attention with Concat KV cache; returns (output, present key, present value).

    rotary: (cos, sin) tables from `builder.rotary_tables`, or None without rotary encoding.
    keep: boolean (B, 1, L, S) mask, or (B, 1, 1, L, S) when grouped (H != K).
    """
    H, K, hd, bias = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.attention_bias,
    )
    path = node_path(key)
    q = split_heads(g, linear(g, x, f"{key}.q_proj", bias), H, hd, f"{path}/q_heads")
    k = split_heads(g, linear(g, x, f"{key}.k_proj", bias), K, hd, f"{path}/k_heads")
    v = split_heads(g, linear(g, x, f"{key}.v_proj", bias), K, hd, f"{path}/v_heads")
    if config.qk_norm:  # over each head's hd features, the last axis
        q = rms_norm(g, q, f"{key}.q_norm", config.norm_eps)
        k = rms_norm(g, k, f"{key}.k_norm", config.norm_eps)
    if rotary is not None:
        trad = config.rope_traditional
        q = rotate(g, q, *rotary, hd, trad, f"{path}/q_rotary")
        k = rotate(g, k, *rotary, hd, trad, f"{path}/k_rotary")
    k_all = g.node("Concat", [past[0], k], f"{path}/k_cache/Concat", axis=2)  # (B, K, S, hd)
    v_all = g.node("Concat", [past[1], v], f"{path}/v_cache/Concat", axis=2)
    out = scaled_dot_product(g, q, k_all, v_all, keep, config, f"{path}/sdpa")
    return linear(g, out, f"{key}.o_proj", config.attention_out_bias), k_all, v_all


#   x (B, L, h·hd) ─Reshape(B, L, h, hd)─RMSNorm─Reshape(B, L, h·hd)─▶


def head_rms_norm(g: Graph, x: str, key: str, heads: int, config: ModelConfig) -> str:
    """RMSNorm of each head's features in the packed (B, L, heads·hd) layout the ort ops take."""
    path, hd = node_path(key), config.head_dim
    x = g.node("Reshape", [x, g.constant([0, 0, heads, hd], np.int64)], f"{path}/SplitHeads")
    x = rms_norm(g, x, key, config.norm_eps)
    return g.node("Reshape", [x, g.constant([0, 0, heads * hd], np.int64)], f"{path}/MergeHeads")


#   x ─q/k/v_proj─[RotaryEmbedding q, k]─GroupQueryAttention(past, seqlens_k, total, bias)─o_proj─▶
#                                                  └─▶ present key, present value


def attention_ort(
    g: Graph,
    x: str,
    key: str,
    config: ModelConfig,
    rotary: tuple[str, str, str] | None,
    gqa_inputs: tuple[str, str, str],
    past: tuple[str, str],
    local_window_size: int | None = None,
) -> tuple[str, str, str]:
    """com.microsoft GroupQueryAttention (and RotaryEmbedding); returns (output, present k, v).

    rotary: (position_ids, cos_cache, sin_cache) for com.microsoft RotaryEmbedding, or None.
    gqa_inputs: (seqlens_k, total_sequence_length, attention_bias) from `builder.gqa_inputs`:
        every row counts all S slots as cache; padding is masked by the additive bias.
    local_window_size: the kernel's sliding window (a query sees that many keys, itself
        included), or None; the bias masks the window too, so the kernel's only saves work.
    """
    H, K, hd, bias = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.attention_bias,
    )
    path = node_path(key)
    q = linear(g, x, f"{key}.q_proj", bias)  # (B, L, H·hd)
    k = linear(g, x, f"{key}.k_proj", bias)  # (B, L, K·hd)
    v = linear(g, x, f"{key}.v_proj", bias)
    if config.qk_norm:
        q = head_rms_norm(g, q, f"{key}.q_norm", H, config)
        k = head_rms_norm(g, k, f"{key}.k_norm", K, config)
    if rotary is not None:
        attrs = dict(domain=MS_DOMAIN, interleaved=int(config.rope_traditional))
        attrs["rotary_embedding_dim"] = hd
        q = g.node("RotaryEmbedding", [q, *rotary], f"{path}/q_rotary", num_heads=H, **attrs)
        k = g.node("RotaryEmbedding", [k, *rotary], f"{path}/k_rotary", num_heads=K, **attrs)
    seqlens_k, total, attention_bias = gqa_inputs
    inputs = [q, k, v, past[0], past[1], seqlens_k, total, "", "", "", attention_bias]
    out, present_k, present_v = g.node(
        "GroupQueryAttention",
        inputs,
        f"{path}/GroupQueryAttention",
        domain=MS_DOMAIN,
        outputs=3,
        num_heads=H,
        kv_num_heads=K,
        scale=hd**-0.5,
        **({} if local_window_size is None else {"local_window_size": local_window_size}),
    )
    return linear(g, out, f"{key}.o_proj", config.attention_out_bias), present_k, present_v
