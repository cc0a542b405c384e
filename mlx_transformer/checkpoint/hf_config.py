"""Our ModelConfig as a Hugging Face config.json: which family describes it, and that family's
fields. No MLX: `convert --to-hf` (checkpoint/hf.py) and the export folder (export/deploy.py)
both write it from here.

"gpt2" when the model is exactly GPT-2 (learned positions, pre-norm LayerNorm, biases, tied
embeddings, multi-head, head size = width / heads); "llama" when it is exactly Llama (rotary in
halves, pre-norm RMSNorm, SwiGLU); "qwen2" for Llama with biases on q/k/v but not o (and none in
the MLP); "qwen3" for Llama with q/k norm (and no MLP bias). A Llama config states every
KV-cache dim explicitly (num_key_value_heads, head_dim), so the export folder also uses it to
describe the graph's interface of a model no Hugging Face family describes (the paper's decoder
among them).
"""

from __future__ import annotations

from ..config import ModelConfig

# Our hidden_act -> Hugging Face's name for it.
HF_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "swiglu": "silu"}


def is_gpt2(c: ModelConfig) -> bool:
    """Exactly GPT-2's architecture (any activation Hugging Face's GPT-2 takes)."""
    return (
        c.norm_position == "pre"
        and not c.scale_embeddings
        and c.position_encoding == "learned"
        and c.norm_type == "layernorm"
        and c.hidden_act != "swiglu"
        and c.attention_bias
        and c.attention_out_bias
        and not c.qk_norm
        and c.mlp_bias
        and c.tie_word_embeddings
        and c.num_key_value_heads == c.num_attention_heads
        and c.head_dim * c.num_attention_heads == c.hidden_size
    )


def _llama_like(c: ModelConfig) -> bool:
    """Rotary in halves, pre-norm RMSNorm, SwiGLU: what Llama, Qwen2 and Qwen3 share."""
    return (
        c.norm_position == "pre"
        and not c.scale_embeddings
        and c.position_encoding == "rope"
        and not c.rope_traditional
        and c.norm_type == "rmsnorm"
        and c.hidden_act == "swiglu"
    )


def is_llama(c: ModelConfig) -> bool:
    """Exactly Llama's architecture (one bias switch for all four attention projections)."""
    return _llama_like(c) and not c.qk_norm and c.attention_out_bias == c.attention_bias


def is_qwen2(c: ModelConfig) -> bool:
    """Llama with biases on q, k and v but not o, and an MLP without biases."""
    return (
        _llama_like(c)
        and not c.qk_norm
        and c.attention_bias
        and not c.attention_out_bias
        and not c.mlp_bias
    )


def is_qwen3(c: ModelConfig) -> bool:
    """Llama with per-head q/k RMSNorm, and an MLP without biases."""
    return (
        _llama_like(c) and c.qk_norm and c.attention_out_bias == c.attention_bias and not c.mlp_bias
    )


def family_of(c: ModelConfig) -> str | None:
    """The Hugging Face model_type that is exactly this model, or None."""
    tests = {"gpt2": is_gpt2, "llama": is_llama, "qwen2": is_qwen2, "qwen3": is_qwen3}
    return next((family for family, test in tests.items() if test(c)), None)


def token_ids(c: ModelConfig, special_ids: dict[str, int] | None) -> dict[str, int]:
    """bos/eos/pad_token_id fields for the ids that exist in the vocabulary."""
    special = special_ids or {}
    return {
        f"{name}_token_id": special[name]
        for name in ("bos", "eos", "pad")
        if 0 <= special.get(name, -1) < c.vocab_size
    }


def hf_config(c: ModelConfig, family: str, special_ids: dict[str, int] | None = None) -> dict:
    """config.json of `family` (`family_of`) with our dims and the special token ids."""
    if family == "gpt2":
        hf = {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": c.vocab_size,
            "n_embd": c.hidden_size,
            "n_layer": c.num_hidden_layers,
            "n_head": c.num_attention_heads,
            "n_inner": c.intermediate_size,
            "n_positions": c.max_position_embeddings,
            "n_ctx": c.max_position_embeddings,  # mlx-lm requires it (transformers ignores it)
            "activation_function": HF_ACTIVATIONS[c.hidden_act],
            "layer_norm_epsilon": c.norm_eps,
            "tie_word_embeddings": True,
        }
    else:
        architecture = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        hf = {
            "architectures": [architecture.get(family, "Qwen3ForCausalLM")],
            "model_type": family,
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "max_position_embeddings": c.max_position_embeddings,
            "hidden_act": HF_ACTIVATIONS[c.hidden_act],
            "rms_norm_eps": c.norm_eps,
            "rope_theta": c.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "attention_bias": c.attention_bias,
            "mlp_bias": c.mlp_bias,
            "tie_word_embeddings": c.tie_word_embeddings,
        }
        if c.rope_scaling is not None:  # transformers reads rope_parameters, mlx-lm rope_scaling
            hf["rope_parameters"] = {**c.rope_scaling, "rope_theta": c.rope_theta}
            hf["rope_scaling"] = dict(c.rope_scaling)
        if family == "qwen2":  # its biases are fixed by the family, not stated
            del hf["attention_bias"], hf["mlp_bias"]
        elif family == "qwen3":
            del hf["mlp_bias"]
    return {**hf, **token_ids(c, special_ids)}
