"""`OnnxModel`: one onnxruntime session of an exported decoder, its KV cache in and out.

    model = OnnxModel("onnx/", provider="cpu")
    ids, mask = left_pad([[5, 6, 7], [8]])
    logits, present = model(ids, mask)  # prefill: logits (2, 3, V)
    mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    logits, present = model(logits[:, -1:].argmax(-1), mask, present)  # one step
    logits, _ = model(ids, mask, logits_to_keep=1)  # only the last position's: (2, 1, V)

The KV cache goes out as `present.*` and comes back as `past_key_values.*`; on GPU providers IO
binding keeps it on the device between calls. With `share_buffer` (the ort flavour on the CPU)
past and present are one preallocated buffer per tensor that GroupQueryAttention appends to in
place (`SharedKV`, onnxruntime-genai's `past_present_share_buffer`), instead of a copy of the
whole cache per step. Batches are left-padded; positions are counted
from the attention mask (Hugging Face style), so a padded row gives the same logits as alone.
Where a provider computes some chunks wrongly, `OnnxModel` cuts them (`workarounds`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mlx_transformer.errors import UserError

from .contract import (
    LOGITS,
    LOGITS_TO_KEEP,
    MODEL_FILE,
    PRESENT,
    feeds,
    kv_names,
    read_io,
    select_precision,
)
from .providers import DEVICE_TYPES, create_session, full_name


def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of different lengths as one (B, T) batch, padded on the left.

    The numpy side of `mlx_transformer.generate.decode.left_pad`; the graph always takes a mask.
    Returns:
        (input_ids (B, T) int64, attention_mask (B, T) int64: 1 on real tokens).
    """
    if any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    T = max(len(r) for r in rows)
    ids = np.full((len(rows), T), pad_id, np.int64)
    mask = np.zeros((len(rows), T), np.int64)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :], mask[i, T - len(r) :] = r, 1
    return ids, mask


def positions_from_mask(attention_mask: np.ndarray, length: int) -> np.ndarray:
    """Position of each of the last `length` tokens: real tokens before it, clamped at 0."""
    positions = np.cumsum(attention_mask, axis=1) - 1
    return np.maximum(positions[:, -length:], 0).astype(np.int64)


class SharedKV:
    """The KV cache of a `share_buffer` session: per tensor one (B, K, capacity, hd) OrtValue that
    the graph reads as past and writes as present in place; the first `length` columns hold
    tokens. Opaque: pass it back as `past`."""

    STEP = 256  # columns added when it is full (a copy of the cache each time)

    def __init__(self, buffers: list, length: int):
        self.buffers, self.length = buffers, length


class OnnxModel:
    """One decoder session and its IO contract (io.json): logits and KV cache per call.

    Args:
        onnx_dir: an exported folder (model.onnx + io.json).
        provider: execution provider (cpu, cuda, webgpu, openvino, ... or onnxruntime's name).
        io_binding: keep the KV cache on the device between calls; default: on for GPU providers.
        provider_options: passed to the provider.
        strict: no silent CPU fallback (`session.disable_cpu_ep_fallback`).
        io: the io.json contents, for a folder that has none yet (during export).
        precision: which of the folder's precisions to load (default: its first).
        share_buffer: where the graph supports it (ort flavour, CPU, no sliding window), keep
            the KV cache in preallocated buffers that are past and present at once: `present`
            is then a `SharedKV`. Measured 1.2x (batch 1) to 1.6x (batch 8) faster decode steps.
    """

    def __init__(
        self,
        onnx_dir: str | Path,
        provider: str = "cpu",
        io_binding: bool | None = None,
        provider_options: dict | None = None,
        strict: bool = False,
        io: dict | None = None,
        precision: str | None = None,
        share_buffer: bool = False,
    ):
        self.dir = Path(onnx_dir)
        self.io = select_precision(read_io(onnx_dir) if io is None else io, precision, onnx_dir)
        self.session, self.placement = create_session(
            self.dir / self.io.get("model", MODEL_FILE),
            provider,
            provider_options=provider_options,
            strict=strict,
        )
        # Graphs exported before LOGITS_TO_KEEP (or by others) compute every position's logits;
        # the runtime then slices them, so callers see the same shapes either way.
        names = self.session.get_inputs() + self.session.get_overridable_initializers()
        self.keeps_logits = LOGITS_TO_KEEP in {i.name for i in names}
        self.layers = self.io["num_hidden_layers"]
        self.context_length = self.io["context_length"]
        # A sliding-window model needs only its last past_window columns of past (and the
        # columns of its attention sinks): the cache is cut back to them whenever it reaches
        # twice that (a copy every past_window steps).
        self.past_window = self.io.get("past_window")
        self.sinks = self.io.get("attention_sinks", 0) if self.past_window else 0
        # ... and when its positions have no table either, it runs past the context.
        self.unbounded = bool(self.past_window and self.io.get("unbounded_positions") is True)
        device = DEVICE_TYPES.get(full_name(provider))
        use_binding = device is not None if io_binding is None else io_binding
        self.device = (device or "cpu") if use_binding else None
        # com.microsoft GroupQueryAttention rejects a multi-token chunk after a non-empty past
        # when batch > 1: such chunks are fed one token at a time.
        gqa = self.io.get("flavour") == "ort"
        self.split_chunks = gqa
        cpu = full_name(provider) == "CPUExecutionProvider"
        self.share_buffer = share_buffer and gqa and cpu and not self.past_window
        # The WebGPU plugin EP (0.4.0, on Mesa lavapipe) computes GroupQueryAttention wrongly
        # for 32 or more new tokens (measured: logit errors ~0.2-0.7 from position 8 on, with
        # or without attention_bias); 31 and fewer are exact. So feed it at most 16 at a time.
        webgpu = full_name(provider) == "WebGpuExecutionProvider"
        self.max_chunk = 16 if gqa and webgpu else None
        self.workarounds = (
            ["GroupQueryAttention inputs cut to <= 16 tokens"] if self.max_chunk else []
        )

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.io["num_key_value_heads"], 0, self.io["head_dim"])
        return [np.zeros(shape, np.float32) for _ in range(2 * self.layers)]

    def __call__(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        past: Sequence | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[np.ndarray, list]:
        """Logits (B, L, V) and the present KV cache (2 per layer) for new tokens (B, L).

        attention_mask is (B, past + L); past is None (nothing yet) or the previous `present`.
        logits_to_keep: n > 0 returns the logits of the last n positions only, (B, min(n, L),
        V), and the graph skips the LM head at the others (a prompt needs only its last).
        """
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0, got {logits_to_keep}")
        input_ids = np.asarray(input_ids, np.int64)
        attention_mask = np.asarray(attention_mask, np.int64)
        B, L = input_ids.shape
        S = attention_mask.shape[1]
        if S > self.context_length and not self.unbounded:
            raise UserError(
                f"sequence of {S} tokens exceeds the model's context of {self.context_length}"
            )
        past = self.empty_past(B) if past is None else past
        chunks = self._chunks(B, L, S - L)
        if len(chunks) == 1:
            return self._run(input_ids, attention_mask, past, logits_to_keep)
        pieces = []
        for start, stop in chunks:
            # this chunk's share of the kept positions; none: 1 is computed and dropped
            wanted = logits_to_keep - (L - stop) if logits_to_keep else stop - start
            keep = max(wanted, 1) if logits_to_keep else 0
            chunk = input_ids[:, start:stop], attention_mask[:, : S - L + stop]
            logits, past = self._run(*chunk, past, keep)
            if wanted > 0:
                pieces.append(logits[:, -wanted:])
        return np.concatenate(pieces, axis=1), past

    def _chunks(self, B: int, L: int, P: int) -> list[tuple[int, int]]:
        """Cut L new tokens after P past ones into pieces the session computes correctly."""
        size = min(L, self.max_chunk or L)
        chunks, start = [], 0
        while start < L:
            after_past = P + start > 0
            n = 1 if self.split_chunks and B > 1 and after_past else size
            chunks.append((start, min(L, start + n)))
            start += n
        return chunks

    def _keep(self, keep: int, L: int) -> np.ndarray | None:
        """The LOGITS_TO_KEEP feed, or None where the graph's default (all) does as well."""
        return np.array(keep, np.int64) if 0 < keep < L and self.keeps_logits else None

    # onnxruntime 1.32's IO binding cannot set an overridable initializer ("Failed to find
    # NodeArg"): calls that keep fewer logits than tokens (prompts) run without binding.

    def _run(self, input_ids, attention_mask, past, keep=0) -> tuple[np.ndarray, list]:
        logits, present = self._run_graph(input_ids, attention_mask, past, keep)
        return (logits[:, -keep:] if keep else logits), present

    def _run_graph(self, input_ids, attention_mask, past, keep) -> tuple[np.ndarray, list]:
        if self.share_buffer:
            return self._run_shared(input_ids, attention_mask, past, keep)
        L = input_ids.shape[1]
        positions = positions_from_mask(attention_mask, L)  # from the whole mask: past cut or not
        kept = past[0].shape[2] if isinstance(past[0], np.ndarray) else past[0].shape()[2]
        full_mask, attention_mask = attention_mask, self._graph_mask(attention_mask, kept, L)
        keep = self._keep(keep, L) if self.device is None else None
        inputs = feeds(input_ids, attention_mask, positions, past, keep)
        if self.device is None:
            outputs = self.session.run(None, inputs)
            return outputs[0], self._bounded(outputs[1:], full_mask)
        binding = self.session.io_binding()
        for name, value in inputs.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:  # a present from the previous call, still on the device
                binding.bind_ortvalue_input(name, value)
        binding.bind_output(LOGITS, "cpu")
        for name in kv_names(PRESENT, self.layers):
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), self._bounded(list(outputs[1:]), full_mask)

    def _run_shared(self, input_ids, attention_mask, past, keep) -> tuple[np.ndarray, SharedKV]:
        B, L = input_ids.shape
        past = past if isinstance(past, SharedKV) else SharedKV([], 0)
        positions = positions_from_mask(attention_mask, L)
        attention_mask = attention_mask[:, attention_mask.shape[1] - past.length - L :]
        length = past.length + L
        keep = self._keep(keep, L)
        if keep is not None:  # unbound: the present comes back whole and is copied into buffers
            arrays = [np.ascontiguousarray(b.numpy()[:, :, : past.length]) for b in past.buffers]
            inputs = feeds(input_ids, attention_mask, positions, arrays or self.empty_past(B), keep)
            logits, *present = self.session.run(None, inputs)
            return logits, SharedKV(self._buffers(present, length), length)
        buffers = self._reserve(past, B, length)
        binding = self.session.io_binding()
        for name, value in feeds(input_ids, attention_mask, positions, buffers).items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output(LOGITS, "cpu")  # first: get_outputs() follows the binding order
        for name, value in zip(kv_names(PRESENT, self.layers), buffers):
            binding.bind_ortvalue_output(name, value)  # the past's own buffer
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy(), SharedKV(buffers, length)

    def _reserve(self, past: SharedKV, B: int, needed: int) -> list:
        """The past's buffers, or larger copies of them when `needed` columns do not fit."""
        capacity = past.buffers[0].shape()[2] if past.buffers else 0
        if needed <= capacity:
            return past.buffers
        return self._buffers([b.numpy() for b in past.buffers] or self.empty_past(B), needed)

    def _buffers(self, arrays: list[np.ndarray], needed: int) -> list:
        """New buffers with room for `needed` columns (whole STEPs), `arrays` (B, K, n, hd) in
        their first n."""
        grown = min(max(self.context_length, needed), -(-needed // SharedKV.STEP) * SharedKV.STEP)
        buffers = []
        for array in arrays:
            B, K, n, hd = array.shape
            buffer = np.zeros((B, K, grown, hd), np.float32)
            buffer[:, :, :n] = array
            buffers.append(ort.OrtValue.ortvalue_from_numpy(buffer))
        return buffers

    # A cut past holds the first H columns (every row's sinks; left padding makes them differ
    # by row) and the last past_window ones. The graph counts positions within the mask it is
    # given, so in that mask the head keeps only the sinks: they count 0..sinks-1 and the recent
    # tokens go on from there, their distances unchanged (all the window compares).

    def _head(self, attention_mask: np.ndarray) -> int:
        """Columns kept at the start of a cut past: the sinks of the most left-padded row."""
        return self.sinks + int(np.argmax(attention_mask > 0, axis=1).max()) if self.sinks else 0

    def _graph_mask(self, attention_mask: np.ndarray, kept: int, L: int) -> np.ndarray:
        """The mask for a past of `kept` columns: the whole one's last columns, or (cut) its
        head's sinks and its last kept - H columns."""
        S = attention_mask.shape[1]
        if kept + L == S:
            return attention_mask
        H = self._head(attention_mask)
        first = np.argmax(attention_mask > 0, axis=1)[:, None]  # each row's position 0
        sinks = attention_mask[:, :H] * (np.arange(H)[None] - first < self.sinks)
        return np.concatenate([sinks, attention_mask[:, S - (kept - H) - L :]], axis=1)

    def _bounded(self, present: list, attention_mask: np.ndarray) -> list:
        """The present cut to its head and last past_window columns once it has twice that (and
        every real token of the head that is no sink has left every row's window), or as is."""
        W = self.past_window
        if not W:
            return present
        shape = present[0].shape if isinstance(present[0], np.ndarray) else present[0].shape()
        H = self._head(attention_mask)
        if shape[2] < H + 2 * W:
            return present
        if self.sinks and attention_mask.sum(axis=1).min() <= H + W + 1:
            return present  # a row's head still holds tokens in its window
        # Device values come back to the host once per W steps; the next call uploads them.
        arrays = [p if isinstance(p, np.ndarray) else p.numpy() for p in present]
        return [np.concatenate([a[:, :, :H], a[:, :, -W:]], axis=2) for a in arrays]
