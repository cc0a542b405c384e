"""Generate text from an exported folder with numpy + onnxruntime + the tokenizer only (no MLX).

    gen = OnnxGenerator("onnx/", provider="cpu")
    for segment in gen.stream("To be", max_tokens=50, temp=0.8, seed=0):
        print(segment, end="", flush=True)

Batched prompts are left-padded (`session.left_pad`) and run by `session.OnnxModel` (KV cache,
IO binding on GPU providers), so a padded row gives the same tokens as alone. Sampling is numpy
(`sampling`), in the same order as the MLX generator.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlx_transformer.errors import UserError
from mlx_transformer.generate.rules import (
    OVERFLOW_POLICIES,
    available_memory,
    chat_prompt_ids,
    check_kv_cache_fits,
    kv_cache_bytes,
    overflow_message,
    read_prompt,
    slide_keep,
    validate_max_tokens,
    validate_repetition,
)
from mlx_transformer.tokenizer_files import find_tokenizer, load_tokenizer

from .sampling import apply_repetition_penalty, make_sampler
from .session import OnnxModel, left_pad


@dataclass
class Generation:
    """One row's result: generated ids, their text (with a tokenizer), why it stopped."""

    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None  # "eos", "stop", "length" (max tokens) or "context"


class OnnxGenerator:
    """Batched sampling with streaming text, on any execution provider.

    Args:
        onnx_dir: an exported folder; its tokenizer (tokenizer.model, or an imported model's
            tokenizer.json) is used when present.
        provider, io_binding, provider_options, strict, precision, share_buffer (default on):
            see `OnnxModel`.
    """

    def __init__(self, onnx_dir: str | Path, provider: str = "cpu", **model_options):
        model_options.setdefault("share_buffer", True)  # the KV cache is opaque here
        self.model = OnnxModel(onnx_dir, provider, **model_options)
        self.tokenizer = None
        path = find_tokenizer(onnx_dir)
        if path is not None:
            self.tokenizer = load_tokenizer(path)
            if "vocab_size" in self.model.io:
                self.tokenizer.check_fits(self.model.io["vocab_size"])
        special = self.model.io.get("special_tokens") or {}
        self.eos_id = special.get("eos", -1)
        # Generation stops at any of these: the tokenizer's (several where its
        # generation_config.json lists them), else io.json's eos.
        self.eos_ids = set(self.tokenizer.eos_ids if self.tokenizer else [self.eos_id]) - {-1}
        self.pad_id = max(special.get("pad", 0), 0)

    # -- token level ---------------------------------------------------------------------------

    def generate_step(
        self,
        prompts: Sequence[Sequence[int]],
        temp: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        repetition_context_size: int = 64,
        seed: int | None = None,
        overflow: str = "error",
    ) -> Iterator[np.ndarray]:
        """Yield the next token of every row, (B,).

        Prompts are left-padded into one batch; each row's positions start at 0. A window of
        L tokens yields at most context - L tokens; then generation ends ("error": the caller
        checked prompt + max_tokens fits) or, with "slide", the last half of the context is
        prefilled again with positions from 0 — the same policy as the MLX generator, so greedy
        text matches it token for token. A portable export of a sliding-window rotary model
        (`OnnxModel.unbounded`) never fills: it runs until the caller stops, in bounded memory.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("every prompt needs at least one token")
        if overflow not in OVERFLOW_POLICIES:
            raise UserError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}")
        sampler = make_sampler(temp, top_p, min_p, top_k, seed)
        context, endless = self.model.context_length, self.model.unbounded
        keep = slide_keep(context)
        rows = [[int(t) for t in p] for p in prompts]
        fits = endless or max(map(len, rows)) < context
        window = rows if fits else [r[-keep:] for r in rows]
        while True:
            ids, mask = left_pad(window, self.pad_id)
            history = np.where(mask == 1, ids, -1)
            logits, past = self.model(ids, mask, logits_to_keep=1)  # no LM head elsewhere
            # A sliding window with unbounded positions never fills: the cache stays bounded.
            for _ in itertools.count() if endless else range(context - ids.shape[1]):
                last = logits[:, -1].astype(np.float64)
                if repetition_penalty != 1.0:
                    recent = history[:, -repetition_context_size:]
                    last = apply_repetition_penalty(last, recent, repetition_penalty)
                token = sampler(last).astype(np.int64)
                yield token
                for row, t in zip(rows, token):
                    row.append(int(t))
                mask = np.concatenate([mask, np.ones((len(rows), 1), np.int64)], axis=1)
                history = np.concatenate([history, token[:, None]], axis=1)
                logits, past = self.model(token[:, None], mask, past)
            if overflow != "slide":
                return
            window = [r[-keep:] for r in rows]

    def generate_tokens(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int = 100,
        stop: Sequence[str] = (),
        stop_at_eos: bool = True,
        **sampling,
    ) -> list[Generation]:
        """Generate for each prompt (token ids) until an eos id, a stop string, or max_tokens."""
        *_, (results, _) = self._generate(prompts, max_tokens, stop, stop_at_eos, sampling)
        return results

    def check_request(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int,
        stop: Sequence[str] = (),
        overflow: str = "error",
    ) -> None:
        """Raise UserError, before any work, for a request that cannot run: a bad max_tokens,
        token ids outside the vocabulary, prompt + max_tokens past the context (with "error"),
        or a KV cache larger than the memory there is (when the cache lives in host memory)."""
        try:
            validate_max_tokens(max_tokens)
        except ValueError as e:
            raise UserError(str(e)) from None
        if stop and self.tokenizer is None:
            raise UserError("stop strings need a tokenizer (none in this folder)")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("every prompt needs at least one token")
        vocab = self.model.io.get("vocab_size")
        if vocab is not None and any(not 0 <= int(t) < vocab for p in prompts for t in p):
            raise UserError(f"a prompt token id is outside the model's vocabulary 0..{vocab - 1}")
        longest, context = max(len(p) for p in prompts), self.model.context_length
        endless = self.model.unbounded  # a bounded cache and positions without end
        if overflow == "error" and longest + max_tokens > context and not endless:
            raise UserError(overflow_message(longest, max_tokens, context))
        if self.model.device is None:  # without IO binding the cache is numpy's
            io, B, tokens = self.model.io, len(prompts), min(context, longest + max_tokens)
            K, hd = io["num_key_value_heads"], io["head_dim"]
            needed = kv_cache_bytes(io["num_hidden_layers"], K, hd, B, tokens, itemsize=4)
            check_kv_cache_fits(needed, tokens, B, available_memory())

    def _generate(self, prompts, max_tokens, stop, stop_at_eos, sampling):
        """After each step yield (Generations so far, the text each row added in this step)."""
        self.check_request(prompts, max_tokens, stop, sampling.get("overflow", "error"))
        results = [Generation(text="" if self.tokenizer else None) for _ in prompts]
        detoks = [self.tokenizer.detokenizer() if self.tokenizer else None for _ in prompts]
        segments = ["" for _ in prompts]
        if max_tokens == 0:
            yield results, segments
            return
        hold = max((len(s) for s in stop), default=1) - 1  # text that may start a stop string
        steps = self.generate_step(prompts, **sampling)
        for n, token in enumerate(steps, start=1):
            for i, (r, detok) in enumerate(zip(results, detoks)):
                segments[i] = ""
                if r.finish_reason is not None:
                    continue
                t = int(token[i])
                if stop_at_eos and t in self.eos_ids:
                    r.finish_reason = "eos"
                else:
                    r.tokens.append(t)
                    if detok is not None:
                        detok.add_token(t)
                if n >= max_tokens and r.finish_reason is None:
                    r.finish_reason = "length"
                if detok is not None:
                    segments[i] = self._update_text(r, detok, stop, hold)
            if all(r.finish_reason for r in results):
                steps.close()
                yield results, segments
                return
            yield results, segments
        for i, r in enumerate(results):  # the context filled up
            if r.finish_reason is None:
                r.finish_reason = "context"
                if detoks[i] is not None:
                    segments[i] = self._update_text(r, detoks[i], stop, hold)
        yield results, segments

    @staticmethod
    def _update_text(r: Generation, detok, stop, hold) -> str:
        """Extend r.text by what is safe to show (returned); cut at the first stop string."""
        if r.finish_reason is not None:
            detok.finalize()
        full = detok.text
        cut = min((full.find(s) for s in stop if s in full), default=-1)
        if cut >= 0:
            full, r.finish_reason = full[:cut], "stop"
        shown = len(full) if r.finish_reason is not None else max(len(r.text), len(full) - hold)
        segment = full[len(r.text) : shown]
        r.text = full[:shown]
        return segment

    # -- text level ----------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, chat: bool = False) -> list[int]:
        """Ids of a prompt, as the MLX generator encodes it; `chat`: `text` is a user message
        (or a list of {"role", "content"}) rendered with the tokenizer's chat template."""
        if self.tokenizer is None:
            raise UserError("this folder has no tokenizer; pass token ids instead")
        if chat:
            return chat_prompt_ids(self.tokenizer, text)
        if add_bos:
            return self.tokenizer.encode(text, bos=True)
        return self.tokenizer.encode_prompt(text)  # an empty prompt starts from EOS, as in MLX

    def generate(
        self,
        prompts: str | Sequence[str],
        max_tokens: int = 100,
        add_bos: bool = False,
        chat: bool = False,
        **kw,
    ) -> list[Generation]:
        """Generate for one prompt or a batch; see `generate_step` for the sampling options.
        `chat`: each prompt is a user message, rendered with the chat template (`encode`)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = [self.encode(p, add_bos, chat) for p in prompts]
        return self.generate_tokens(ids, max_tokens, **kw)

    def stream(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 100,
        add_bos: bool = False,
        chat: bool = False,
        **kw,
    ) -> Iterator[str]:
        """Yield text segments of one prompt's (text or token ids) continuation as they become
        final; `chat`: the text is a user message, rendered with the chat template."""
        stop, stop_at_eos = kw.pop("stop", ()), kw.pop("stop_at_eos", True)
        ids = [self.encode(prompt, add_bos, chat) if isinstance(prompt, str) else list(prompt)]
        for _, segments in self._generate(ids, max_tokens, stop, stop_at_eos, kw):
            if segments[0]:
                yield segments[0]


# -- CLI: mlx-transformer onnx-generate ---------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="ONNX_DIR", help="folder written by `export`")
    parser.add_argument(
        "--prompt", action="append", required=True, help='repeat for a batch; "-" reads stdin'
    )
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--temp", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument(
        "--repetition-context-size", type=int, default=64, help="tokens the penalty looks back"
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--provider", default="cpu", help="cpu, cuda, webgpu, openvino, ...")
    parser.add_argument(
        "--precision", help="which of the folder's precisions to run (default: its first)"
    )
    parser.add_argument(
        "--overflow",
        choices=OVERFLOW_POLICIES,
        default="error",
        help="prompt + max tokens beyond the context: error, or re-prefill the last half (a "
        "portable sliding-window rotary export never overflows)",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="each prompt is a user message: apply the model's chat template to it",
    )


def run(args: argparse.Namespace) -> int:
    try:  # every setting first, before anything is read or loaded
        make_sampler(args.temp, args.top_p, args.min_p, args.top_k)
        validate_max_tokens(args.max_tokens)
        validate_repetition(args.repetition_penalty, args.repetition_context_size)
    except ValueError as e:
        raise UserError(str(e)) from None
    prompts = [read_prompt(p) for p in args.prompt]
    gen = OnnxGenerator(args.model, provider=args.provider, precision=args.precision)
    ids = [gen.encode(p, chat=args.chat) for p in prompts]
    gen.check_request(ids, args.max_tokens, args.stop, args.overflow)
    # Only now, with every error ruled out, where the graph runs: the error line comes alone.
    print(f"[{gen.model.placement.requested}: {gen.model.placement.status}]", file=sys.stderr)
    sampling = dict(
        temp=args.temp,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        repetition_context_size=args.repetition_context_size,
        seed=args.seed,
        overflow=args.overflow,
    )
    if len(prompts) == 1:
        if not args.chat:  # a chat's answer is shown alone, as `generate --chat` shows it
            print(_printable(prompts[0]), end="", flush=True)
        for segment in gen.stream(ids[0], args.max_tokens, stop=args.stop, **sampling):
            print(segment, end="", flush=True)
        print()
        return 0
    results = gen.generate_tokens(ids, args.max_tokens, stop=args.stop, **sampling)
    for prompt, result in zip(prompts, results):
        shown = "" if args.chat else _printable(prompt)
        print(f"{shown}{result.text}\n[{result.finish_reason}]\n")
    return 0


def _printable(text: str) -> str:
    """`text` with bytes that were not UTF-8 (lone surrogates) shown as U+FFFD, as decoded."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
