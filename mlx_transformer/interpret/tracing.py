"""Where a fact sits: causal tracing, direct logit attribution and per-head activation patching.

Causal tracing (ROME's): run the prompt clean, then corrupted (Gaussian noise on the subject's
token embeddings at `noise` x the embedding matrix's std, several samples; or a counterfactual
prompt of the same length), then corrupted again while restoring one clean activation: the
residual stream, the MLP output or the attention output of one (layer, position). How much of
the answer's probability comes back says where the model carries what it needs. A window variant
restores `window` consecutive MLP layers at once.

Direct logit attribution: the final residual stream is a sum of the embeddings, every head's
and every MLP's output and the biases; through the final norm with its scale frozen at this
input (TransformerLens's `apply_ln_to_stack`), each term's share of the answer's logit.

Every function takes one prompt (ids of shape (L,)) and returns numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..model import Transformer
from .hooks import patch, run_with_cache

KINDS = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}


@dataclass
class Corruption:
    """How to corrupt a prompt: a counterfactual prompt (`ids`, same length), or noise added to
    the token embeddings (`noise`, (samples, L, D), zero outside the subject)."""

    ids: mx.array  # (L,)
    noise: mx.array | None = None

    @property
    def rows(self) -> int:
        return 1 if self.noise is None else self.noise.shape[0]

    def hooks(self, repeat: int) -> dict:
        """Hooks that corrupt a batch of `repeat` x rows copies."""
        if self.noise is None:
            return {}
        noise = mx.concatenate([self.noise] * repeat) if repeat > 1 else self.noise
        return {"hook_embed": lambda x: x + noise.astype(x.dtype)}

    def batch(self, repeat: int) -> mx.array:
        return mx.broadcast_to(self.ids[None], (repeat * self.rows, self.ids.shape[0]))


def subject_noise(
    model: Transformer, length: int, subject: range, samples: int = 10, scale: float = 3.0,
    seed: int = 0,
) -> mx.array:  # fmt: skip
    """(samples, L, D) Gaussian noise, std `scale` x the token embeddings' std, on `subject`."""
    std = scale * float(np.std(np.array(model.embed_tokens.weight.astype(mx.float32))))
    rng = np.random.default_rng(seed)
    noise = np.zeros((samples, length, model.config.hidden_size), np.float32)
    noise[:, subject.start : subject.stop] = rng.normal(
        0.0, std, (samples, len(subject), model.config.hidden_size)
    )
    return mx.array(noise)


def _answer_prob(logits: mx.array, answer: int) -> mx.array:
    """P(answer) at the last position, per row."""
    last = logits[:, -1].astype(mx.float32)
    return mx.softmax(last, axis=-1)[:, answer]


def _mean_over_samples(p: mx.array, rows: int) -> np.ndarray:
    return np.array(p.reshape(-1, rows).mean(axis=1))


def causal_trace(
    model: Transformer, ids: mx.array, answer: int, corruption: Corruption, window: int = 3
) -> dict:
    """P(answer) when one clean activation is restored into the corrupted run.

    Returns clean_prob, corrupt_prob (floats) and, (layers, L) each: "resid", "mlp", "attn" (one
    layer's state at one position) and "mlp_window" (MLP outputs of `window` layers around it).
    """
    L, n_layers = ids.shape[0], len(model.layers)
    rows = corruption.rows
    names = [f"blocks.{i}.{KINDS[k]}" for i in range(n_layers) for k in KINDS]
    clean_logits, clean = run_with_cache(model, ids[None], names=names)
    corrupt_logits, _ = run_with_cache(model, corruption.batch(1), corruption.hooks(1), names=())
    result = {
        "clean_prob": _answer_prob(clean_logits, answer).item(),
        "corrupt_prob": float(_mean_over_samples(_answer_prob(corrupt_logits, answer), rows)[0]),
    }
    # Batched runs per (kind, layer): row block j restores position j, a chunk of positions at
    # a time so that long prompts and many samples stay within memory.
    chunk = positions_per_run(L, rows, model.config.num_attention_heads)

    def restore(layers: list[int], kind: str) -> np.ndarray:
        probs = []
        for start in range(0, L, chunk):
            n = min(chunk, L - start)
            which = mx.repeat(mx.eye(L, dtype=mx.bool_)[start : start + n], rows, axis=0)
            hooks = corruption.hooks(n)
            for i in layers:
                name = f"blocks.{i}.{KINDS[kind]}"
                hooks[name] = patch(clean[name], which)
            logits, _ = run_with_cache(model, corruption.batch(n), hooks, names=())
            probs.append(_mean_over_samples(_answer_prob(logits, answer), rows))
        return np.concatenate(probs)

    for kind in KINDS:
        result[kind] = np.stack([restore([i], kind) for i in range(n_layers)])
    result["mlp_window"] = np.stack(
        [restore(list(window_layers(i, window, n_layers)), "mlp") for i in range(n_layers)]
    )
    return result


def positions_per_run(length: int, rows: int, heads: int) -> int:
    """How many positions one batched run restores: at most 2^16 tokens and 2^27 attention
    weights per run (about 0.5 GB of float32 weights)."""
    by_tokens = (1 << 16) // (rows * length)
    by_weights = (1 << 27) // (rows * heads * length * length)
    return max(1, min(length, by_tokens, by_weights))


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The `window` layers centred on `layer` (ROME's), clipped to the model."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def head_patching(
    model: Transformer, ids: mx.array, answer: int, corruption: Corruption
) -> np.ndarray:
    """P(answer) when one head's clean output (`hook_z`, every position) is patched into the
    corrupted run: (layers, heads). TransformerLens's `get_act_patch_attn_head_out_all_pos`."""
    n_layers, H = len(model.layers), model.config.num_attention_heads
    rows = corruption.rows
    names = [f"blocks.{i}.attn.hook_z" for i in range(n_layers)]
    _, clean = run_with_cache(model, ids[None], names=names)
    head_of_row = mx.repeat(mx.arange(H), rows)  # row block h patches head h
    out = []
    for i in range(n_layers):
        source = clean[f"blocks.{i}.attn.hook_z"]

        def fn(x, source=source):
            hit = (mx.arange(H)[None] == head_of_row[:, None])[:, None, :, None]
            return mx.where(hit, source, x)

        hooks = corruption.hooks(H) | {f"blocks.{i}.attn.hook_z": fn}
        logits, _ = run_with_cache(model, corruption.batch(H), hooks, names=())
        out.append(_mean_over_samples(_answer_prob(logits, answer), rows))
    return np.stack(out)


def logit_attribution(model: Transformer, ids: mx.array, answer: int, position: int = -1) -> dict:
    """Each component's direct contribution to the answer's logit at `position`.

    Returns "heads" (layers, heads), "mlp" (layers,), "embed", "pos_embed", "biases" (the
    attention output biases and the final norm's bias), "logit" (the model's), all floats or
    numpy. The parts sum to the logit (up to float error); pre-norm models only.
    """
    cfg = model.config
    n_layers, H, hd = len(model.layers), cfg.num_attention_heads, cfg.head_dim
    names = ["hook_embed", "blocks.0.hook_resid_pre", f"blocks.{n_layers - 1}.hook_resid_post"]
    names += [f"blocks.{i}.{n}" for i in range(n_layers) for n in ("attn.hook_z", "hook_mlp_out")]
    logits, cache = run_with_cache(model, ids[None], names=names)
    final = cache[f"blocks.{n_layers - 1}.hook_resid_post"][0, position].astype(mx.float32)
    unembed = (model.embed_tokens if cfg.tie_word_embeddings else model.lm_head).weight[answer]
    unembed = unembed.astype(mx.float32)
    norm = model.norm if cfg.final_norm else None
    layernorm = norm is not None and cfg.norm_type == "layernorm"
    eps = cfg.norm_eps
    if norm is None:
        scale = mx.array(1.0)
    elif layernorm:
        scale = mx.rsqrt(mx.var(final) + eps)
    else:
        scale = mx.rsqrt(mx.mean(final * final) + eps)
    weight = norm.weight.astype(mx.float32) if norm is not None else mx.ones_like(final)
    direction = weight * unembed

    def attribute(c: mx.array) -> mx.array:
        """Contribution of residual terms c (..., D) through the frozen final norm."""
        c = c.astype(mx.float32)
        if layernorm:
            c = c - c.mean(axis=-1, keepdims=True)
        return (c * scale) @ direction

    parts = {}
    heads, mlps, biases = [], [], mx.array(0.0)
    for i, layer in enumerate(model.layers):
        z = cache[f"blocks.{i}.attn.hook_z"][0, position]  # (H, hd)
        w_o = layer.attn.o_proj.weight.astype(mx.float32).reshape(-1, H, hd)  # (D, H, hd)
        heads.append(attribute(mx.einsum("hd,Dhd->hD", z.astype(mx.float32), w_o)))
        mlps.append(attribute(cache[f"blocks.{i}.hook_mlp_out"][0, position]))
        if "bias" in layer.attn.o_proj:
            biases = biases + attribute(layer.attn.o_proj.bias)
    embedded = cache["blocks.0.hook_resid_pre"][0, position]
    token = cache["hook_embed"][0, position] * model.embed_scale
    parts["embed"] = attribute(token)
    parts["pos_embed"] = attribute(embedded - token)  # learned or sinusoidal; 0 for RoPE
    if layernorm:
        biases = biases + norm.bias.astype(mx.float32) @ unembed
    if not cfg.tie_word_embeddings and "bias" in model.lm_head:
        biases = biases + model.lm_head.bias[answer].astype(mx.float32)
    parts["biases"] = biases
    parts["heads"], parts["mlp"] = mx.stack(heads), mx.stack(mlps)
    parts["logit"] = logits[0, position, answer].astype(mx.float32)
    mx.eval(parts)
    return {k: (float(v.item()) if v.ndim == 0 else np.array(v)) for k, v in parts.items()}
