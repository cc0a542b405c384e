"""The generation rules the MLX generator and the ONNX runtime share, so they cannot drift apart.

Framework-free: `export/` imports it.
"""

from __future__ import annotations

# Context overflow: "error" refuses prompt + max_tokens > context before any work; "slide" keeps
# going by prefilling the last SLIDE_KEEP_FRACTION of the context again, with positions from 0.
OVERFLOW_POLICIES = ("error", "slide")
SLIDE_KEEP_FRACTION = 0.5


def slide_keep(context: int) -> int:
    """Tokens kept (and prefilled again) when the window slides."""
    return max(1, int(context * SLIDE_KEEP_FRACTION))


def overflow_message(prompt_tokens: int, max_tokens: int, context: int) -> str:
    return (
        f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
        f"{prompt_tokens + max_tokens} exceeds the model's context of {context} tokens; shorten "
        "the prompt, lower --max-tokens, or pass --overflow slide"
    )


def validate_sampling(temp: float, top_p: float, min_p: float, top_k: int) -> None:
    """Raise ValueError naming the first out-of-range sampler setting."""
    if not temp >= 0:
        raise ValueError(f"temperature must be >= 0, got {temp}")
    if not 0 <= top_p <= 1:
        raise ValueError(f"top-p must be in [0, 1], got {top_p}")
    if not 0 <= min_p <= 1:
        raise ValueError(f"min-p must be in [0, 1], got {min_p}")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise ValueError(f"top-k must be a non-negative integer, got {top_k}")
