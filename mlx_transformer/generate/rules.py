"""The generation rules the MLX generator and the ONNX runtime share, so they cannot drift apart:
context overflow, the checks of the settings, how a prompt is read, and the KV cache's memory.

Framework-free: `export/` imports it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import UserError

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


def validate_repetition(penalty: float, context_size: int) -> None:
    """Raise ValueError for a repetition penalty that is not a positive number, or a window that
    is not a positive integer (any size: a window past the history is the whole history)."""
    if not (isinstance(penalty, (int, float)) and 0 < penalty < float("inf")):
        raise ValueError(f"repetition penalty must be a positive number, got {penalty}")
    if not (isinstance(context_size, int) and context_size >= 1):
        raise ValueError(f"repetition context size must be a positive integer, got {context_size}")


def validate_max_tokens(max_tokens: int) -> None:
    if not (isinstance(max_tokens, int) and max_tokens >= 0):
        raise ValueError(f"--max-tokens must be a non-negative integer, got {max_tokens}")


# -- the prompt -----------------------------------------------------------------------------------

# A prompt is at most a context of text; more on stdin is a mistake (or /dev/zero).
MAX_PROMPT_BYTES = 64 << 20


def read_prompt(prompt: str) -> str:
    """The prompt as given on the command line, or stdin's bytes for "-".

    Bytes that are not UTF-8 reach the tokenizer as lone surrogates (`surrogateescape`), as they
    do from the command line: it encodes them as byte pieces or says where they are.
    """
    if prompt != "-":
        return prompt
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text-only stdin (an embedding application's)
        return sys.stdin.read()
    data = stream.read(MAX_PROMPT_BYTES + 1)
    if len(data) > MAX_PROMPT_BYTES:
        raise UserError(f"the prompt on stdin is over {MAX_PROMPT_BYTES >> 20} MiB; pass less")
    return data.decode("utf-8", "surrogateescape")


def chat_prompt_ids(tokenizer, prompt) -> list[int]:
    """Ids of a chat prompt: `prompt` (a user message, or a list of {"role", "content"}) rendered
    with the tokenizer's chat template and the generation prompt, encoded as transformers does
    (special tokens in the rendered text are read as such; the template adds any bos).

    Raises:
        UserError: the tokenizer has no chat template, or it fails on these messages.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = tokenizer.encode(text)
    if not ids:
        raise UserError("the chat template rendered the prompt as no text at all")
    return ids


# -- memory ---------------------------------------------------------------------------------------


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, batch: int, tokens: int, itemsize):
    """Bytes of a KV cache: a key and a value per layer, (batch, kv_heads, tokens, head_dim)."""
    return 2 * layers * batch * kv_heads * tokens * head_dim * itemsize


def check_kv_cache_fits(needed: int, tokens: int, batch: int, available: int | None) -> None:
    """Refuse, before allocating, a KV cache larger than the memory there is (None: unknown)."""
    if available is None or needed <= available:
        return
    rows = f" x {batch} prompts" if batch > 1 else ""
    raise UserError(
        f"the KV cache for {tokens:,} tokens{rows} would need {_size(needed)} and "
        f"{_size(available)} of memory is available; lower --max-tokens or shorten the prompt"
    )


def available_memory() -> int | None:
    """Bytes a new allocation can take from the system: Linux's MemAvailable, within the
    container's memory limit (cgroup v2) if it has one; elsewhere the physical memory; None if
    unknown."""
    available = _meminfo_available()
    if available is None:
        try:
            available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            return None
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            available = min(available, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return available


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _size(nbytes: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes:,} bytes"
