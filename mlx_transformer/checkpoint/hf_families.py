"""A Hugging Face config.json as our ModelConfig, one reader per family (no MLX).

gpt2; llama (Llama 1-3.x, SmolLM: rotary in halves, pre-norm RMSNorm, SwiGLU); qwen2 (Llama with
biases on q, k and v but not o); qwen3 (Llama with a per-head RMSNorm of q and k before rotary,
and head_dim set apart from hidden_size / heads). Rotary scaling (`rope_from_hf`): plain,
"linear" and "llama3"; "dynamic" rescales by the running length, which one fixed ONNX graph and
our cache cannot follow, so it is refused with the others. Sliding windows (Mistral, Qwen's
use_sliding_window) are read on top of these by hf_window.py.

What we do not compute is refused with `UnsupportedField` naming the field; `hf.import_hf` adds
the file's path.
"""

from __future__ import annotations

import dataclasses

from ..config import ROPE_SCALINGS, ModelConfig
from ..errors import UserError

GPT2_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}


class UnsupportedField(UserError):
    """A config.json field whose value we cannot compute; the message names the field."""


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise UnsupportedField(f"unsupported Hugging Face configuration: {what}")


def config_from_gpt2(hf: dict) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    _require(act in GPT2_ACTIVATIONS, f"activation_function {act!r}")
    _require(
        not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx"
    )
    _require(hf.get("scale_attn_weights", True), "scale_attn_weights=false")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["n_embd"],
        num_hidden_layers=hf["n_layer"],
        num_attention_heads=hf["n_head"],
        intermediate_size=hf.get("n_inner"),
        max_position_embeddings=hf["n_positions"],
        position_encoding="learned",
        norm_type="layernorm",
        norm_position="pre",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        hidden_act=GPT2_ACTIVATIONS[act],
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        initializer_range=hf.get("initializer_range", 0.02),
        extra={"imported_from": "gpt2"},
    )


def rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, our rope_scaling) from `rope_parameters` (transformers ≥ 5) or from
    `rope_theta` and `rope_scaling` (before)."""
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = hf.get(field) or {}
    _require(isinstance(rope, dict), f"{field} {rope!r} (expected one JSON object)")
    kind = rope.get("rope_type", rope.get("type", "default"))
    _require(
        kind == "default" or kind in ROPE_SCALINGS,
        f"{field}.rope_type {kind!r} (supported: default, {', '.join(ROPE_SCALINGS)})",
    )
    for name in ("partial_rotary_factor", "attention_factor"):
        value = rope.get(name, hf.get(name, 1.0))
        _require(value in (1.0, None), f"{name} {value!r} (only 1.0 is supported)")
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if kind == "default":
        return theta, None
    for name in ROPE_SCALINGS[kind]:
        _require(name in rope, f"{field}.{name} missing (rope_type {kind!r} needs it)")
    return theta, {"rope_type": kind, **{k: rope[k] for k in ROPE_SCALINGS[kind]}}


def config_from_llama(hf: dict) -> ModelConfig:
    _require(hf.get("hidden_act", "silu") == "silu", f"hidden_act {hf.get('hidden_act')!r}")
    rope_theta, rope_scaling = rope_from_hf(hf)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"),
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        position_encoding="rope",
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rope_traditional=False,
        norm_type="rmsnorm",
        norm_position="pre",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        hidden_act="swiglu",
        attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        initializer_range=hf.get("initializer_range", 0.02),
        extra={"imported_from": "llama"},
    )


def _llama_with(hf: dict, family: str, **fields) -> ModelConfig:
    """A Qwen config read as Llama's, then `fields` (windows: hf_window.window_from_hf)."""
    config = config_from_llama({**hf, "mlp_bias": False})
    return dataclasses.replace(config, **fields, extra={"imported_from": family})


def config_from_qwen2(hf: dict) -> ModelConfig:
    """Qwen2 / Qwen2.5: biases on q, k and v, none on o (fixed by the family, not config.json)."""
    return _llama_with(hf, "qwen2", attention_bias=True, attention_out_bias=False)


def config_from_qwen3(hf: dict) -> ModelConfig:
    """Qwen3: per-head RMSNorm of q and k; attention_bias (all four projections) as stated."""
    bias = hf.get("attention_bias", False)
    return _llama_with(hf, "qwen3", qk_norm=True, attention_bias=bias, attention_out_bias=bias)


CONFIG_READERS = {
    "gpt2": config_from_gpt2,
    "llama": config_from_llama,
    "qwen2": config_from_qwen2,
    "qwen3": config_from_qwen3,
}
