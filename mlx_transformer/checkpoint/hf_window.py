"""Sliding-window attention in Hugging Face config.json files ⇄ ours. No MLX.

Each family states its windows its own way; the masks are the same (a query at i sees keys
i - W < j <= i), so only the fields are mapped:

    mistral    sliding_window: every layer slides (layer_types is ignored, as transformers does)
    ministral  sliding_window and layer_types (Llama with per-layer windows)
    qwen2/3    use_sliding_window, sliding_window, and layer_types or max_window_layers (layers
               from that index on slide)
    llama      layer_types with sliding_window, as mlx-lm reads them (transformers' Llama ignores
               both; a plain sliding_window without layer_types means nothing to either)

Export: a Llama-shaped model whose every layer slides is written as Mistral, one with some full
layers as Ministral; a Qwen2/Qwen3 keeps its family, with use_sliding_window and layer_types.
Attention sinks have no Hugging Face field, so such a model stays ours.
"""

from __future__ import annotations

from ..config import ModelConfig
from ..errors import UserError
from .hf_config import family_of

# Families read like Llama whose only difference is the window.
LLAMA_LIKE = ("mistral", "ministral")


def window_from_hf(hf: dict, kind: str, num_layers: int) -> dict:
    """Our sliding_window/layer_types fields from a Hugging Face config.json of family `kind`."""
    W = hf.get("sliding_window")
    types = hf.get("layer_types")
    if kind == "mistral":
        types = None
    elif kind in ("qwen2", "qwen3"):
        W = W if hf.get("use_sliding_window", False) else None
        if types is None and W is not None:
            first = hf.get("max_window_layers", num_layers)
            types = [
                "sliding_attention" if i >= first else "full_attention" for i in range(num_layers)
            ]
    elif kind == "llama":
        if not types or "sliding_attention" not in types:
            return {}
    elif kind != "ministral":
        return {}
    if W is None:
        return {}
    if types is not None and "sliding_attention" not in types:
        return {}
    if types is not None and all(t == "sliding_attention" for t in types):
        types = None  # every layer slides: the default
    return {"sliding_window": W, "layer_types": types}


def window_to_hf(hf: dict, c: ModelConfig) -> dict:
    """The Hugging Face config.json `hf` (Llama or GPT-2 fields) with our window stated in it:
    Mistral when every layer slides, Ministral when some do; unchanged without a window."""
    if not c.windowed:
        return hf
    if c.attention_sinks:
        raise UserError(
            "attention_sinks has no Hugging Face equivalent; this model can only be saved in "
            "our own format"
        )
    types = [
        "sliding_attention" if c.layer_window(i) else "full_attention"
        for i in range(c.num_hidden_layers)
    ]
    if hf["model_type"] in ("qwen2", "qwen3"):  # max_window_layers: what before layer_types read
        window = {"use_sliding_window": True, "sliding_window": c.sliding_window}
        first = types.index("sliding_attention")
        return {**hf, **window, "layer_types": types, "max_window_layers": first}
    if hf["model_type"] != "llama":
        raise UserError(
            f"{hf['model_type']} has no sliding window in Hugging Face; only a Llama-shaped model "
            "(rotary, RMSNorm, SwiGLU) with a window can be written (as Mistral or Ministral)"
        )
    family = "mistral" if c.all_windowed else "ministral"
    out = {**hf, "architectures": [f"{family.capitalize()}ForCausalLM"], "model_type": family}
    out["sliding_window"] = c.sliding_window
    if family == "ministral":
        out["layer_types"] = types
    return out


def window_mlx_lm_limits(c: ModelConfig) -> list[str]:
    """What mlx-lm would load wrong in the folder `window_to_hf` describes."""
    if not c.windowed:
        return []
    if family_of(c) in ("qwen2", "qwen3"):
        return ["it has sliding-window layers, and mlx-lm's Qwen2 and Qwen3 have none"]
    if c.all_windowed:
        return [
            "every layer slides, and mlx-lm reads Mistral as Llama, which ignores sliding_window "
            "(it needs layer_types with at least one full-attention layer)"
        ]
    return ["mlx-lm has no Ministral (its Llama takes the same layer_types and sliding_window)"]
