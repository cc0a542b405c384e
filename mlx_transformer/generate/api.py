"""Text generation with a KV cache, in layers (mlx-lm's shape, in a few hundred lines):

    batch_generate_step / generate_step   token ids in, token ids out, one step at a time
    stream_generate                        text in, `GenerationResponse`s out (text pieces, timings)
    generate / batch_generate              text in, text out

Prompts are encoded without BOS, as training data is (documents are only followed by EOS); an
empty prompt starts from EOS alone. Stop strings are matched on the decoded text, across token
boundaries; text that might be the start of a stop string is held back until it is not.

Context overflow (`overflow`): "error" (default) refuses prompt + max_tokens > context before any
work. "slide" keeps going: when the window is full, the last half of the context (prompt and
generated tokens alike) is prefilled again, with positions from 0, and decoding continues; a
prompt longer than the context is cut to its last half-context tokens first. Re-prefilling
costs one prefill of half a context per half a context of new tokens, and works for every
position encoding (a rotating cache would need positions beyond those the model was trained on).
A model whose every layer slides (`sliding_window`) with rotary or no positions never overflows:
its caches are bounded (`RollingKVCache`, then `rolling.RingCacheDecoder`) and positions go on
counting past `max_position_embeddings`, in constant memory and with no re-prefill (with
learned or sinusoidal positions such a model rolls within its context, and overflows as others).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ..errors import UserError
from ..model import Transformer
from .decode import (
    DynamicCacheDecoder,
    StaticCacheDecoder,
    device_memory_available,
    left_pad,
    prefill,
)
from .rolling import RingCacheDecoder
from .rules import (
    OVERFLOW_POLICIES,
    chat_prompt_ids,
    check_kv_cache_fits,
    kv_cache_bytes,
    overflow_message,
    read_prompt,
    slide_keep,
    validate_max_tokens,
)
from .sample import LogitsProcessor, Sampler, greedy, make_logits_processors, make_sampler
from .stops import StopStrings, find_stop, partial_stop_length  # noqa: F401 (re-exported)


class ContextOverflowError(UserError, ValueError):
    """prompt + max_tokens does not fit the model's context (and overflow="error")."""


# -- tokens in, tokens out ------------------------------------------------------------------------


def batch_generate_step(
    prompts: Sequence[Sequence[int]],
    model: Transformer,
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    prefill_step_size: int = 512,
    overflow: str = "error",
    compiled: bool = True,
) -> Iterator[list[int]]:
    """Generate for several prompts at once (left-padded); yield one token per prompt per step.

    Rows never influence each other: greedy output of a batch equals each prompt run alone.
    The generator runs for max_tokens steps unless the caller stops iterating.

    Args:
        prompts: token ids, each non-empty.
        model: the model.
        max_tokens: steps to run.
        sampler: logits (B, V) -> ids (B,); default greedy.
        logits_processors: (history (B, T), logits (B, V)) -> logits, applied in order.
        prefill_step_size: prompt tokens per forward pass during prefill.
        overflow: "error" or "slide" (see the module docstring).
        compiled: use the compiled static-cache decode step (False: the eager KVCache path).
    Returns:
        An iterator of lists of B token ids. Errors in the arguments raise here, eagerly, and so
        does a UserError when the KV cache would not fit in memory.
    """
    context, vocab = model.config.max_position_embeddings, model.config.vocab_size
    rows = [[int(t) for t in p] for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    if any(not 0 <= t < vocab for r in rows for t in r):  # MLX would read past the embeddings
        raise ValueError(f"a prompt token id is outside the model's vocabulary 0..{vocab - 1}")
    validate_max_tokens(max_tokens)
    if not (isinstance(prefill_step_size, int) and prefill_step_size >= 1):
        raise ValueError(f"prefill_step_size must be a positive integer, got {prefill_step_size}")
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(
            f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got {overflow!r}"
        )
    longest = max(len(r) for r in rows)
    options = (sampler or greedy, list(logits_processors), prefill_step_size, compiled)
    c = model.config
    fits = longest + max_tokens <= context
    # Every layer slides: a bounded cache. With rotary positions (or none) nothing overflows;
    # learned or sinusoidal ones roll within their table, and slide (or refuse) past it.
    if rolls(c) or (c.all_windowed and fits):
        held = c.sliding_window + c.attention_sinks + min(longest, prefill_step_size)
        check_cache_memory(model, len(rows), held)
        return _decode_window(model, rows, max_tokens, *options, rolling=True)
    if overflow == "error" and longest + max_tokens > context:
        raise ContextOverflowError(overflow_message(longest, max_tokens, context))
    check_cache_memory(model, len(rows), min(context, longest + max_tokens))
    return _steps(model, rows, max_tokens, context, options)


def rolls(config) -> bool:
    """True for a model that generates in constant memory past its context: every layer slides
    (a bounded cache) and positions are rotary or none (learned/sinusoidal ones end at the table's
    size, so those models keep the context limit and `overflow`)."""
    return config.all_windowed and config.position_encoding in ("rope", "none")


def check_cache_memory(model: Transformer, batch: int, tokens: int) -> None:
    """Refuse a generation whose KV cache (`tokens` per row, the most a window holds) would not
    fit in memory, before allocating it: a config may claim a context of millions of tokens."""
    c = model.config
    itemsize = model.embed_tokens.weight.dtype.size
    needed = kv_cache_bytes(
        c.num_hidden_layers, c.num_key_value_heads, c.head_dim, batch, tokens, itemsize
    )
    check_kv_cache_fits(needed, tokens, batch, device_memory_available())


def _steps(model, rows, max_tokens, context, options) -> Iterator[list[int]]:
    """Decode window after window; each window starts with a prefill of its prompt."""
    keep = slide_keep(context)
    produced = 0
    window = rows if max(len(r) for r in rows) < context else [r[-keep:] for r in rows]
    while produced < max_tokens:
        L = max(len(w) for w in window)
        n = min(max_tokens - produced, context - L)
        for tokens in _decode_window(model, window, n, *options):
            for row, token in zip(rows, tokens):
                row.append(token)
            produced += 1
            yield tokens
        window = [r[-keep:] for r in rows]


def _decode_window(
    model, prompts, n, sampler, processors, prefill_step_size, compiled, rolling=False
):
    """Prefill `prompts`, then yield n steps; step i+1 is queued before step i is read.
    `rolling`: bounded caches and the ring-buffer decoder (a sliding-window model)."""
    input_ids, mask = left_pad(prompts)
    B, L = input_ids.shape
    prefix_mask = mask[:, :-1] if mask is not None else None  # the last token is always real
    cache = prefill(model, input_ids[:, :-1], prefix_mask, prefill_step_size, rolling)
    if rolling and compiled:
        decoder = RingCacheDecoder(model, cache, batch_size=B)
    elif rolling:  # the caches know each row's padding and position: decode tokens are all real
        decoder = DynamicCacheDecoder(model, cache, None)
    elif compiled:
        decoder = StaticCacheDecoder(model, cache, prefix_mask, capacity=L + n, batch_size=B)
    else:
        decoder = DynamicCacheDecoder(model, cache, prefix_mask)
    history = input_ids if mask is None else mx.where(mask > 0, input_ids, -1)

    def pick(logits: mx.array) -> mx.array:
        nonlocal history
        for processor in processors:
            logits = processor(history, logits)
        token = sampler(logits).astype(mx.int32)
        if processors:
            history = mx.concatenate([history, token[:, None]], axis=1)
        return token

    y = pick(decoder(input_ids[:, -1]))
    mx.async_eval(y)
    for i in range(n):
        if i + 1 < n:
            next_y = pick(decoder(y))
            mx.async_eval(next_y)
        yield y.tolist()
        if i + 1 < n:
            y = next_y


def generate_step(prompt_ids: Sequence[int], model: Transformer, **kwargs) -> Iterator[int]:
    """One prompt's tokens, one at a time; keyword arguments as `batch_generate_step`."""
    steps = batch_generate_step([prompt_ids], model, **kwargs)
    return (tokens[0] for tokens in steps)


# -- text in, text out ----------------------------------------------------------------------------


@dataclass
class GenerationResponse:
    """One step of `stream_generate`."""

    text: str  # text completed by this step (may be empty: held bytes or a possible stop)
    token: int | None  # the token of this step (None for the final flush)
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB, mx.get_peak_memory()
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", or None


def encode_prompt(tokenizer, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
    """Token ids of a prompt: text without BOS; an empty one is [EOS] (Tokenizer.encode_prompt).
    With `chat`, text (a user message) or a list of {"role", "content"} messages is rendered
    with the tokenizer's chat template first (`rules.chat_prompt_ids`)."""
    if chat:
        return chat_prompt_ids(tokenizer, prompt)
    if isinstance(prompt, str):
        return tokenizer.encode_prompt(prompt)
    if not prompt:
        raise ValueError("the prompt has no tokens")
    return [int(t) for t in prompt]


def stream_generate(
    model: Transformer,
    tokenizer,
    prompt: str | Sequence[int],
    *,
    max_tokens: int = 256,
    stop: Sequence[str] = (),
    chat: bool = False,
    **kwargs,
) -> Iterator[GenerationResponse]:
    """Generate text and yield it piece by piece, with timings (tokens/s) and peak memory.

    Stops at EOS (any of `tokenizer.eos_ids`), at a stop string (which is not returned, nor
    anything after it), or after max_tokens. `chat`: apply the tokenizer's chat template to the
    prompt (`encode_prompt`). Other keyword arguments go to `batch_generate_step` (sampler, ...).
    """
    ids = encode_prompt(tokenizer, prompt, chat)
    tic = time.perf_counter()
    steps = generate_step(ids, model, max_tokens=max_tokens, **kwargs)
    detok, text = tokenizer.detokenizer(), StopStrings(stop)
    stats = dict(prompt_tokens=len(ids), prompt_tps=0.0, generation_tokens=0, generation_tps=0.0)
    reason = "length"
    for n, token in enumerate(steps):
        now = time.perf_counter()
        if n == 0:
            stats["prompt_tps"] = len(ids) / (now - tic)
            tic = now
        stats["generation_tokens"] = n + 1
        stats["generation_tps"] = n / (now - tic) if n else 0.0  # tokens after the first
        if token in tokenizer.eos_ids:
            reason = "stop"
            break
        detok.add_token(token)
        piece = text.add(detok.last_segment)
        if text.stopped:
            reason = "stop"
            yield GenerationResponse(piece, token, **stats, peak_memory=_peak_gb())
            break
        yield GenerationResponse(piece, token, **stats, peak_memory=_peak_gb())
    piece = ""
    if not text.stopped:
        detok.finalize()
        piece = text.add(detok.last_segment) + text.flush()
        reason = "stop" if text.stopped else reason
    yield GenerationResponse(piece, None, **stats, peak_memory=_peak_gb(), finish_reason=reason)


def _peak_gb() -> float:
    return mx.get_peak_memory() / 1e9


def generate(model: Transformer, tokenizer, prompt: str | Sequence[int], **kwargs) -> str:
    """The generated text (without the prompt); keyword arguments as `stream_generate`."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))


@dataclass
class BatchResult:
    """What `batch_generate` returns. Token counts are over all rows; prompt_tps counts up to the
    first step's tokens, generation_tps the tokens after them over the time after them."""

    texts: list[str]
    token_ids: list[list[int]]
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    finish_reasons: list[str] = field(default_factory=list)


def batch_generate(
    model: Transformer,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    *,
    max_tokens: int = 256,
    stop: Sequence[str] = (),
    chat: bool = False,
    **kwargs,
) -> BatchResult:
    """Generate for several prompts at once; each row stops on its own (EOS, stop, length).
    `chat`: apply the tokenizer's chat template to each prompt."""
    rows = [encode_prompt(tokenizer, p, chat) for p in prompts]
    B = len(rows)
    tic = time.perf_counter()
    steps = batch_generate_step(rows, model, max_tokens=max_tokens, **kwargs)
    token_ids: list[list[int]] = [[] for _ in range(B)]
    texts = [StopStrings(stop) for _ in range(B)]
    detoks = [tokenizer.detokenizer() for _ in range(B)]
    reasons: list[str | None] = [None] * B
    result = BatchResult([], token_ids, prompt_tokens=sum(len(r) for r in rows))
    for n, tokens in enumerate(steps):
        if n == 0:
            now = time.perf_counter()
            result.prompt_tps = result.prompt_tokens / (now - tic)
            tic = now
        for b, token in enumerate(tokens):
            if reasons[b] is not None:
                continue
            result.generation_tokens += 1
            if token in tokenizer.eos_ids:
                reasons[b] = "stop"
                continue
            token_ids[b].append(token)
            detoks[b].add_token(token)
            texts[b].add(detoks[b].last_segment)
            if texts[b].stopped:
                reasons[b] = "stop"
        if all(r is not None for r in reasons):
            break
    elapsed = time.perf_counter() - tic  # since the first step's tokens: count those after it
    result.generation_tps = (result.generation_tokens - B) / elapsed if elapsed > 0 else 0.0
    for b in range(B):
        if not texts[b].stopped:
            detoks[b].finalize()
            texts[b].add(detoks[b].last_segment)
    result.texts = [t.text for t in texts]
    result.finish_reasons = [r or "length" for r in reasons]
    result.peak_memory = _peak_gb()
    return result


# -- command line ----------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="CKPT", help="checkpoint folder")
    parser.add_argument("--prompt", default="", help='prompt text, or "-" to read stdin')
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most")
    parser.add_argument("--temp", type=float, default=0.0, help="temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1 = off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="relative floor (0 = off)")
    parser.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)"
    )
    parser.add_argument(
        "--repetition-context-size", type=int, default=64, help="tokens the penalty looks back"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument(
        "--stop", action="append", default=[], help="stop before this text (repeatable)"
    )
    parser.add_argument(
        "--overflow",
        choices=OVERFLOW_POLICIES,
        default="error",
        help="prompt + max tokens over the context: error, or re-prefill the last half (a "
        "sliding-window rotary model never overflows)",
    )
    parser.add_argument("--prefill-step-size", type=int, default=512, help="prompt chunk size")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="the prompt is a user message: apply the model's chat template to it",
    )


def run(args) -> int:
    from ..checkpoint.mlx_io import load_checkpoint
    from ..tokenizer_files import find_tokenizer, load_tokenizer

    try:  # every setting first, before anything is read or loaded
        sampler = make_sampler(args.temp, args.top_p, args.min_p, args.top_k, args.seed)
        processors = make_logits_processors(args.repetition_penalty, args.repetition_context_size)
        validate_max_tokens(args.max_tokens)
        if args.prefill_step_size < 1:
            raise ValueError("--prefill-step-size must be >= 1")
    except ValueError as e:
        raise UserError(str(e)) from None
    prompt = read_prompt(args.prompt)
    tokenizer_path = find_tokenizer(args.model) if Path(args.model).is_dir() else None
    model = load_checkpoint(args.model)
    if tokenizer_path is None:
        raise UserError(
            f"{args.model}: no tokenizer in the checkpoint folder (tokenizer.model or "
            "tokenizer.json)"
        )
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.check_fits(model.config.vocab_size)
    if args.chat:  # the template's errors before any generation
        prompt = chat_prompt_ids(tokenizer, prompt)
    responses = stream_generate(
        model,
        tokenizer,
        prompt,
        max_tokens=args.max_tokens,
        stop=args.stop,
        sampler=sampler,
        logits_processors=processors,
        prefill_step_size=args.prefill_step_size,
        overflow=args.overflow,
    )
    last = None
    for last in responses:
        print(last.text, end="", flush=True)
    print()
    print(
        f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s | "
        f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s | "
        f"peak memory: {last.peak_memory:.3f} GB",
        file=sys.stderr,
    )
    return 0
