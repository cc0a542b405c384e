"""The whole decoder as one ONNX graph: IO table → embeddings → masks → blocks → LM head.

One graph serves prefill (past length 0) and decode; its IO is `contract.io_table`. `build_model`
is the entry point; it checks that every checkpoint tensor ended up in the graph.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx

from mlx_transformer.config import ModelConfig

from .contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    LOGITS_TO_KEEP,
    PAST,
    POSITION_IDS,
    PRESENT,
    io_table,
    kv_pair,
)
from .graph import BOOL, FLOAT, INT32, INT64, Graph
from .layers import MASKED, add_and_norm, attention_ort, attention_portable, linear, mlp
from .weights import Weights

FLAVOURS = ("portable", "ort")
ELEM_TYPES = {"int64": INT64, "float32": FLOAT}  # io_table's dtype names

# -- positions ------------------------------------------------------------------------------------

#   position_ids ─Cast─Unsqueeze─Mul(inv_freq)─┬─Sin─Unsqueeze─┐
#                                               └─Cos─Unsqueeze─Concat(-1)─Reshape(B,L,D)─▶


def sinusoidal(g: Graph, position_ids: str, D: int) -> str:
    """PE(pos, 2i) = sin(pos·f_i), PE(pos, 2i+1) = cos(pos·f_i), f_i = 10000^(-2i/D): (B, L, D)."""
    path = "/model/embed_positions/sinusoidal"
    # float32 in the same order as model.sinusoidal_encoding: exp(-log(10000) * 2i / D)
    steps = np.arange(0, D, 2, dtype=np.float32)
    inv_freq = np.exp(np.float32(-math.log(10000.0)) * steps / np.float32(D)).astype(np.float32)
    pos = g.node("Cast", [position_ids], f"{path}/Cast", to=FLOAT)
    pos = g.node("Unsqueeze", [pos, g.constant([-1], np.int64)], f"{path}/Unsqueeze")
    angles = g.node("Mul", [pos, g.tensor(f"{path}/inv_freq", inv_freq)], f"{path}/Mul")
    sin = g.node("Sin", [angles], f"{path}/Sin")
    cos = g.node("Cos", [angles], f"{path}/Cos")
    last = g.constant([-1], np.int64)
    sin = g.node("Unsqueeze", [sin, last], f"{path}/UnsqueezeSin")
    cos = g.node("Unsqueeze", [cos, last], f"{path}/UnsqueezeCos")
    pairs = g.node("Concat", [sin, cos], f"{path}/Concat", axis=-1)  # (B, L, D/2, 2)
    return g.node("Reshape", [pairs, g.constant([0, 0, D], np.int64)], f"{path}/Reshape")


#   position_ids ─Cast─Unsqueeze(1,3)─Mul(inv_freq)─┬─Cos─▶ (B, 1, L, hd/2) [, 1]
#                                                    └─Sin─▶


def rotary_tables(g: Graph, position_ids: str, config: ModelConfig) -> tuple[str, str]:
    """cos and sin of position · frequency (`ModelConfig.rope_frequencies`), once for all
    layers (portable)."""
    path = "/model/rotary"
    inv_freq = np.array(config.rope_frequencies(), np.float32)
    pos = g.node("Cast", [position_ids], f"{path}/Cast", to=FLOAT)
    pos = g.node("Unsqueeze", [pos, g.constant([1, 3], np.int64)], f"{path}/Unsqueeze")
    angles = g.node("Mul", [pos, g.tensor(f"{path}/inv_freq", inv_freq)], f"{path}/Mul")
    cos = g.node("Cos", [angles], f"{path}/Cos")
    sin = g.node("Sin", [angles], f"{path}/Sin")
    if config.rope_traditional:  # broadcast over the (even, odd) pair axis
        last = g.constant([-1], np.int64)
        cos = g.node("Unsqueeze", [cos, last], f"{path}/UnsqueezeCos")
        sin = g.node("Unsqueeze", [sin, last], f"{path}/UnsqueezeSin")
    return cos, sin


def rotary_caches(g: Graph, config: ModelConfig) -> tuple[str, str]:
    """(max_position_embeddings, hd/2) cos/sin tables for com.microsoft RotaryEmbedding."""
    inv_freq = np.array(config.rope_frequencies())  # float64: the angles are exact
    angles = np.arange(config.max_position_embeddings)[:, None] * inv_freq[None]
    cos = g.tensor("/model/rotary/cos_cache", np.cos(angles).astype(np.float32))
    sin = g.tensor("/model/rotary/sin_cache", np.sin(angles).astype(np.float32))
    return cos, sin


def embeddings(g: Graph, input_ids: str, position_ids: str, config: ModelConfig) -> str:
    """embed[ids] (· √D) + learned or sinusoidal positions: (B, L, D)."""
    x = g.node("Gather", [g.weight("embed_tokens.weight"), input_ids], "/model/embed_tokens/Gather")
    if config.scale_embeddings:
        scale = g.constant(math.sqrt(config.hidden_size))
        x = g.node("Mul", [x, scale], "/model/embed_tokens/Scale")
    if config.position_encoding == "learned":
        table = g.weight("embed_positions.weight")
        pe = g.node("Gather", [table, position_ids], "/model/embed_positions/Gather")
        x = g.node("Add", [x, pe], "/model/embed_positions/Add")
    elif config.position_encoding == "sinusoidal":
        pe = sinusoidal(g, position_ids, config.hidden_size)
        x = g.node("Add", [x, pe], "/model/embed_positions/Add")
    return x


# -- masks ----------------------------------------------------------------------------------------

#   S = Shape(attention_mask)[1], L = Shape(input_ids)[1]
#   q = Range(S-L, S), k = Range(0, S)
#   keep = (k ≤ q AND attention_mask[k] ≠ 0) OR k == q        → (B, 1, L, S) bool


def lengths(g: Graph, input_ids: str, attention_mask: str) -> tuple[str, str, str]:
    """Scalars (0-d int64): batch B, new tokens L, total S."""
    path = "/model/lengths"
    scalar = g.constant([], np.int64)  # Reshape target of a 0-d tensor
    dims = {}
    for name, source, axis in (("B", input_ids, 0), ("L", input_ids, 1), ("S", attention_mask, 1)):
        dim = g.node("Shape", [source], f"{path}/{name}/Shape", start=axis, end=axis + 1)
        dims[name] = g.node("Reshape", [dim, scalar], f"{path}/{name}/Reshape")
    return dims["B"], dims["L"], dims["S"]


def keep_mask(g: Graph, attention_mask: str, L: str, S: str) -> str:
    path = "/model/attn_mask"
    zero, one = g.constant(0, np.int64), g.constant(1, np.int64)
    past = g.node("Sub", [S, L], f"{path}/Past")
    q = g.node("Range", [past, S, one], f"{path}/QueryPositions")
    k = g.node("Range", [zero, S, one], f"{path}/KeyPositions")
    q = g.node("Unsqueeze", [q, g.constant([1], np.int64)], f"{path}/UnsqueezeQ")  # (L, 1)
    causal = g.node("LessOrEqual", [k, q], f"{path}/Causal")  # (L, S)
    diagonal = g.node("Equal", [k, q], f"{path}/Diagonal")
    real = g.node("Cast", [attention_mask], f"{path}/Cast", to=BOOL)  # (B, S)
    real = g.node("Unsqueeze", [real, g.constant([1, 2], np.int64)], f"{path}/Unsqueeze")
    keep = g.node("And", [causal, real], f"{path}/And")  # (B, 1, L, S)
    return g.node("Or", [keep, diagonal], f"{path}/Or")


#   pos = Where(attention_mask, CumSum(attention_mask) - 1, -1)   key positions (B, S), -1 = padding
#   q = pos[:, S-L:], k = pos
#   keep = (k ≥ 0 AND k ≤ q AND (q - k < W OR k < sinks)) OR (k == q by index AND q < 0)


def window_keep_mask(g: Graph, attention_mask: str, L: str, S: str, config: ModelConfig) -> str:
    """The sliding-window mask (`local_attention.window_mask`), from positions counted in the
    mask: only differences of positions matter, so a past cut to its last columns keeps it
    exact."""
    path = "/model/attn_mask_window"
    zero, one = g.constant(0, np.int64), g.constant(1, np.int64)
    counts = g.node("Cast", [attention_mask], f"{path}/Cast", to=INT64)
    cumsum = g.node("CumSum", [counts, one], f"{path}/CumSum")
    pos = g.node("Sub", [cumsum, one], f"{path}/Sub")
    real = g.node("Cast", [attention_mask], f"{path}/Real", to=BOOL)
    pos = g.node("Where", [real, pos, g.constant(-1, np.int64)], f"{path}/KeyPositions")
    past = g.node("Sub", [S, L], f"{path}/Past")
    axis = g.constant([1], np.int64)
    start = g.node("Unsqueeze", [past, g.constant([0], np.int64)], f"{path}/Start")
    end = g.node("Unsqueeze", [S, g.constant([0], np.int64)], f"{path}/End")
    q = g.node("Slice", [pos, start, end, axis], f"{path}/QueryPositions")  # (B, L)
    q = g.node("Unsqueeze", [q, g.constant([2], np.int64)], f"{path}/UnsqueezeQ")  # (B, L, 1)
    k = g.node("Unsqueeze", [pos, axis], f"{path}/UnsqueezeK")  # (B, 1, S)
    keep = g.node("LessOrEqual", [k, q], f"{path}/Causal")
    keep = g.node("And", [keep, g.node("GreaterOrEqual", [k, zero], f"{path}/RealKey")],
                  f"{path}/AndReal")  # fmt: skip
    distance = g.node("Sub", [q, k], f"{path}/Distance")
    near = g.node("Less", [distance, g.constant(config.sliding_window, np.int64)], f"{path}/Near")
    if config.attention_sinks:
        sink = g.node("Less", [k, g.constant(config.attention_sinks, np.int64)], f"{path}/Sink")
        near = g.node("Or", [near, sink], f"{path}/NearOrSink")
    keep = g.node("And", [keep, near], f"{path}/AndNear")
    # A padding query sees only its own key (no empty softmax rows).
    rows = g.node("Range", [past, S, one], f"{path}/QueryIndex")
    rows = g.node("Unsqueeze", [rows, axis], f"{path}/UnsqueezeRows")  # (L, 1)
    own = g.node(
        "Equal", [g.node("Range", [zero, S, one], f"{path}/KeyIndex"), rows], f"{path}/Own"
    )
    padding = g.node("Less", [q, zero], f"{path}/PaddingQuery")
    keep = g.node("Or", [keep, g.node("And", [own, padding], f"{path}/OwnPadding")], f"{path}/Or")
    return g.node("Unsqueeze", [keep, axis], f"{path}/Unsqueeze")  # (B, 1, L, S)


#   seqlens_k = Expand(S - 1, [B]) (int32), total_sequence_length = S (int32),
#   attention_bias = Where(keep, 0, MASKED)         (padding handled by the bias, not seqlens_k)


def group_mask(g: Graph, keep: str, window: int | None) -> str:
    """(B, 1, L, S) -> (B, 1, 1, L, S): the mask of query heads grouped by key/value head."""
    path = "/model/attn_mask" if window is None else "/model/attn_mask_window"
    return g.node("Unsqueeze", [keep, g.constant([1], np.int64)], f"{path}/Group")


def gqa_inputs(g: Graph, keep: str, B: str, S: str, window: int | None = None):
    """(seqlens_k, total_sequence_length, attention_bias) of the layers with this window."""
    path = "/model/gqa_inputs" if window is None else "/model/gqa_inputs_window"
    total = g.node("Cast", [S], f"{path}/total_sequence_length", to=INT32)
    last = g.node("Sub", [total, g.constant(1, np.int32)], f"{path}/Sub")
    batch = g.node("Unsqueeze", [B, g.constant([0], np.int64)], f"{path}/Batch")
    seqlens_k = g.node("Expand", [last, batch], f"{path}/seqlens_k")
    bias = g.node("Where", [keep, g.constant(0.0), g.constant(MASKED)], f"{path}/attention_bias")
    return seqlens_k, total, bias


#   x (B, L, D) ─Slice(axis 1, from -num_logits_to_keep)─▶ (B, min(n, L) or L, D)


def last_positions(g: Graph, x: str) -> str:
    """The last `num_logits_to_keep` positions of the final hidden states (all when 0), so the
    LM head (at a vocabulary of 8000 and width 256, ~40% of a prompt's FLOPs) runs only where
    logits are wanted. The input is an initializer of value 0: clients that do not feed it get
    every position (onnxruntime does not skip nodes whose outputs were not asked for)."""
    path = "/model/logits_to_keep"
    g.tensor(LOGITS_TO_KEEP, np.array(0, np.int64))  # the default of the graph input
    n = g.node("Reshape", [LOGITS_TO_KEEP, g.constant([1], np.int64)], f"{path}/Reshape")
    start = g.node("Neg", [n], f"{path}/Neg")  # -0 = 0: from the first position
    end = g.constant([np.iinfo(np.int64).max], np.int64)
    return g.node("Slice", [x, start, end, g.constant([1], np.int64)], f"{path}/Slice")


# -- the model ------------------------------------------------------------------------------------


def build_graph(config: ModelConfig, weights: Weights, flavour: str, head_copy: bool) -> Graph:
    """All nodes of the model; see `build_model`."""
    g = Graph(weights)
    inputs, outputs = io_table(config)
    for name, dtype, shape in inputs:
        g.input(name, ELEM_TYPES[dtype], shape)
    input_ids, attention_mask, position_ids = INPUT_IDS, ATTENTION_MASK, POSITION_IDS

    x = embeddings(g, input_ids, position_ids, config)
    B, L, S = lengths(g, input_ids, attention_mask)
    keeps = {None: keep_mask(g, attention_mask, L, S)}  # by window (None: full attention)
    if config.windowed:
        keeps[config.sliding_window] = window_keep_mask(g, attention_mask, L, S, config)
    rope = config.position_encoding == "rope"
    if flavour == "ort":
        rotary = (position_ids, *rotary_caches(g, config)) if rope else None
        extras = {W: gqa_inputs(g, keep, B, S, W) for W, keep in keeps.items()}
    else:
        rotary = rotary_tables(g, position_ids, config) if rope else None
        if config.num_attention_heads != config.num_key_value_heads:
            keeps = {W: group_mask(g, keep, W) for W, keep in keeps.items()}

    pre = config.norm_position == "pre"
    residual, h = x, None  # pre-norm: the pending residual sum is fused into the next norm
    for i in range(config.num_hidden_layers):
        layer = f"layers.{i}"
        past = kv_pair(PAST, i)
        if pre:
            normed, residual = add_and_norm(g, residual, h, f"{layer}.attn_norm", config, flavour)
        else:
            normed = residual
        W = config.layer_window(i)
        if flavour == "ort":
            # GroupQueryAttention's own window (onnxruntime 1.32, measured: a query sees
            # local_window_size keys, itself included); it cannot keep sinks
            local = W if W is not None and not config.attention_sinks else None
            h, k, v = attention_ort(
                g, normed, f"{layer}.attn", config, rotary, extras[W], past, local
            )
        else:
            h, k, v = attention_portable(g, normed, f"{layer}.attn", config, rotary, keeps[W], past)
        for value, name in zip((k, v), kv_pair(PRESENT, i)):
            g.rename_output(value, name)
        if pre:
            normed, residual = add_and_norm(g, residual, h, f"{layer}.mlp_norm", config, flavour)
            h = mlp(g, normed, f"{layer}.mlp", config, flavour)
        else:
            residual, _ = add_and_norm(g, residual, h, f"{layer}.attn_norm", config, flavour)
            h = mlp(g, residual, f"{layer}.mlp", config, flavour)
            residual, _ = add_and_norm(g, residual, h, f"{layer}.mlp_norm", config, flavour)
    if pre:
        x, _ = add_and_norm(g, residual, h, "norm", config, flavour)
    else:
        x = residual

    x = last_positions(g, x)
    if not config.tie_word_embeddings:
        logits = linear(g, x, "lm_head", bias=False)
    elif head_copy:  # a separate (D, V) copy that weight quantizers can see as a MatMul weight
        logits = g.node("MatMul", [x, g.weight("embed_tokens.weight", transpose=True)],
                        "/model/lm_head/MatMul")  # fmt: skip
    else:
        head = g.node("Transpose", [g.weight("embed_tokens.weight")], "/model/lm_head/Transpose")
        logits = g.node("MatMul", [x, head], "/model/lm_head/MatMul")
    g.rename_output(logits, LOGITS)
    for name, dtype, shape in outputs:
        g.output(name, ELEM_TYPES[dtype], shape)
    return g


def fallbacks(config: ModelConfig, flavour: str) -> list[str]:
    """Where the ort flavour uses portable pieces because no contrib op expresses the model."""
    if flavour != "ort":
        return []
    notes = []
    if config.norm_type == "rmsnorm":
        notes.append(
            "the first RMSNorm of each stack uses explicit ops (com.microsoft has only the "
            "Skip- variant; SimplifiedLayerNormalization lives in the ai.onnx domain)"
        )
    if config.qk_norm:
        notes.append("the per-head q/k RMSNorm uses explicit ops, between Reshapes")
    if config.position_encoding in ("learned", "sinusoidal"):
        notes.append(f"{config.position_encoding} positions use standard ops (no contrib op)")
    notes.append(
        "GroupQueryAttention gets seqlens_k = total length - 1 for every row and masks padding "
        "with attention_bias (genai's ReduceSum(mask) - 1 is wrong for left padding)"
    )
    notes.append(
        "GroupQueryAttention cannot take a multi-token chunk after a non-empty past when "
        "batch > 1: feed such chunks one token at a time (export.session does)"
    )
    return notes


def build_model(
    config: ModelConfig, weights: Weights, flavour: str = "portable", head_copy: bool = False
) -> onnx.ModelProto:
    """The ONNX model of a checkpoint.

    Args:
        config: the model configuration.
        weights: its tensors (float32); every one must be used.
        flavour: "portable" (standard ops, opset 17) or "ort" (com.microsoft fused ops).
        head_copy: with tied embeddings, store the LM head as its own transposed initializer
            (so int8/int4 quantizers treat it as a MatMul weight) instead of Transpose(embed).
    Returns:
        The ModelProto (float32 weights and IO).
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {', '.join(FLAVOURS)}, got {flavour!r}")
    g = build_graph(config, weights, flavour, head_copy)
    unused = weights.unused()
    if unused:
        raise RuntimeError(f"builder bug: checkpoint tensors not used by the graph: {unused}")
    return g.to_model(
        doc=f"mlx-transformer decoder, {flavour} flavour",
        metadata={"flavour": flavour, "config": config_json(config)},
    )


def config_json(config: ModelConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)
