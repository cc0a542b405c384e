"""Look inside a model: attention maps, the logit lens, ablations and head classifiers.

Numbers come back as numpy arrays; `mlx_transformer.interpret.report` draws and prints them.
Ablations swap modules for the duration of a `with` block, so `model.py` carries no hooks:

    zero a head     the head's slice of the output projection's input is set to 0 (or its mean)
    zero an MLP     the MLP's output is set to 0 (or its mean over positions)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..model import Transformer

# -- attention maps and logit lens ---------------------------------------------------------------


def attention_maps(model: Transformer, ids: mx.array) -> np.ndarray:
    """Attention weights of every layer and head: (layers, B, heads, L, L); rows sum to 1."""
    out = model.forward(ids, output_attentions=True)
    return np.stack([np.array(w.astype(mx.float32)) for w in out.attentions])


def logit_lens(model: Transformer, ids: mx.array) -> np.ndarray:
    """Next-token log-probabilities read from the residual stream after the embedding and after
    every block, through the final norm and LM head: (layers + 1, B, L, vocab).

    The last entry is the model's own output.
    """
    out = model.forward(ids, output_hidden_states=True)
    return np.stack(
        [
            np.array(nn.log_softmax(model.logits_from_hidden(h).astype(mx.float32), axis=-1))
            for h in out.hidden_states
        ]
    )


def lens_summary(logprobs: np.ndarray, ids: np.ndarray, k: int = 5) -> dict:
    """Per layer and position: the top-k next tokens and the probability of the actual next token.

    logprobs: (layers + 1, L, vocab) for one sequence; ids: (L,).
    Returns {"top_ids": (layers+1, L, k), "top_probs": ..., "correct_prob": (layers+1, L-1)}.
    """
    top = np.argsort(-logprobs, axis=-1)[..., :k]
    top_probs = np.exp(np.take_along_axis(logprobs, top, axis=-1))
    targets = ids[1:]
    correct = np.exp(logprobs[:, np.arange(len(targets)), targets])
    return {"top_ids": top, "top_probs": top_probs, "correct_prob": correct}


# -- ablation --------------------------------------------------------------------------------------


class _ReplaceHead(nn.Module):
    """Wraps an output projection: the head's slice of its input becomes `value` (0 or a mean),
    at positions >= start."""

    def __init__(self, linear: nn.Linear, head: int, head_dim: int, value, start: int = 0):
        super().__init__()
        self.linear, self.value, self.start = linear, value, start
        self.lo, self.hi = head * head_dim, (head + 1) * head_dim

    def __call__(self, x: mx.array) -> mx.array:
        cols = mx.arange(x.shape[-1])
        hit = (cols >= self.lo) & (cols < self.hi) & (mx.arange(x.shape[1]) >= self.start)[:, None]
        value = self.value
        if isinstance(value, mx.array):  # a (head_dim,) mean, placed in the head's slice
            value = mx.zeros((x.shape[-1],), x.dtype)
            value[self.lo : self.hi] = self.value
        return self.linear(mx.where(hit, value, x))


class _ReplaceMLP(nn.Module):
    """Wraps an MLP: its output becomes `value` (0 or a mean) at positions >= start."""

    def __init__(self, mlp: nn.Module, value, start: int = 0):
        super().__init__()
        self.mlp, self.value, self.start = mlp, value, start

    def __call__(self, x: mx.array) -> mx.array:
        hit = (mx.arange(x.shape[1]) >= self.start)[:, None]
        return mx.where(hit, mx.array(self.value, dtype=x.dtype), self.mlp(x))


class _Recorder(nn.Module):
    """Passes through, keeping its input (for mean ablation)."""

    def __init__(self, inner: nn.Module, record_output: bool = False):
        super().__init__()
        self.inner, self.record_output, self.seen = inner, record_output, None

    def __call__(self, x: mx.array) -> mx.array:
        y = self.inner(x)
        self.seen = y if self.record_output else x
        return y


@contextlib.contextmanager
def ablated(
    model: Transformer, component: tuple, means: dict | None = None, start: int = 0
) -> Iterator[None]:
    """Within the block, `component` is knocked out: ("head", layer, head) or ("mlp", layer).

    means: from `component_means`; when given, the component is replaced by its mean activation
    instead of zero. start: knock it out only at positions >= start.
    """
    kind, i = component[0], component[1]
    layer = model.layers[i]
    if kind == "head":
        h, hd = component[2], layer.attn.head_dim
        value = means["o_proj_in"][i][h * hd : (h + 1) * hd] if means else 0.0
        owner, name = layer.attn, "o_proj"
        wrapper = _ReplaceHead(layer.attn.o_proj, h, hd, value, start)
    elif kind == "mlp":
        owner, name = layer, "mlp"
        wrapper = _ReplaceMLP(layer.mlp, means["mlp_out"][i] if means else 0.0, start)
    else:
        raise ValueError(f"unknown component {component!r}")
    original = getattr(owner, name)
    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def component_means(model: Transformer, ids: mx.array) -> dict[str, list[mx.array]]:
    """Mean over batch and positions of each layer's head outputs and MLP output on `ids`."""
    originals = [(layer.attn.o_proj, layer.mlp) for layer in model.layers]
    for layer in model.layers:
        layer.attn.o_proj = _Recorder(layer.attn.o_proj)
        layer.mlp = _Recorder(layer.mlp, record_output=True)
    try:
        model(ids)
        means = {
            "o_proj_in": [layer.attn.o_proj.seen.mean(axis=(0, 1)) for layer in model.layers],
            "mlp_out": [layer.mlp.seen.mean(axis=(0, 1)) for layer in model.layers],
        }
    finally:
        for layer, (o_proj, mlp) in zip(model.layers, originals):
            layer.attn.o_proj, layer.mlp = o_proj, mlp
    mx.eval(means)
    return means


def sequence_loss(model: Transformer, ids: mx.array) -> float:
    """Mean next-token cross-entropy (nats) over the sequence(s)."""
    logits = model(ids[:, :-1]).astype(mx.float32)
    return nn.losses.cross_entropy(logits, ids[:, 1:], reduction="mean").item()


def ablation_scores(model: Transformer, ids: mx.array, mode: str = "zero") -> dict[str, np.ndarray]:
    """Loss increase when each head, and each MLP, is knocked out alone.

    Returns {"base_loss": float, "heads": (layers, heads), "mlp": (layers,)} in nats.
    """
    means = component_means(model, ids[:, :-1]) if mode == "mean" else None
    base = sequence_loss(model, ids)
    n_layers, n_heads = len(model.layers), model.config.num_attention_heads
    heads, mlp = np.zeros((n_layers, n_heads)), np.zeros(n_layers)
    for i in range(n_layers):
        for h in range(n_heads):
            with ablated(model, ("head", i, h), means):
                heads[i, h] = sequence_loss(model, ids) - base
        with ablated(model, ("mlp", i), means):
            mlp[i] = sequence_loss(model, ids) - base
    return {"base_loss": base, "heads": heads, "mlp": mlp}


# -- head classifiers ------------------------------------------------------------------------------


def head_scores(model: Transformer, ids: mx.array, seed: int = 0, n_random: int = 24) -> dict:
    """Scores in [0, 1] per (layer, head), well defined on any model.

    previous_token: mean attention from each position to the one before it (on `ids`);
    first_token:    mean attention to position 0 (the "attention sink"), positions >= 1;
    induction:      on a random token sequence repeated twice, mean attention from each token of
                    the repeat to the token that followed its earlier occurrence.
    """
    w = attention_maps(model, ids).mean(axis=1)  # (layers, heads, L, L), mean over batch
    L = w.shape[-1]
    previous = w[..., np.arange(1, L), np.arange(L - 1)].mean(-1)
    first = w[..., 1:, 0].mean(-1)

    n = min(n_random, (model.config.max_position_embeddings - 1) // 2)
    rng = np.random.default_rng(seed)
    half = rng.integers(0, model.config.vocab_size, n)
    wr = attention_maps(model, mx.array(np.concatenate([half, half])[None]))[:, 0]
    queries = np.arange(n, 2 * n)  # second copy; its earlier occurrence is q - n
    induction = wr[..., queries, queries - n + 1].mean(-1)
    return {"previous_token": previous, "first_token": first, "induction": induction}


def top_heads(scores: np.ndarray, k: int = 3) -> list[tuple[int, int, float]]:
    order = np.argsort(-scores, axis=None)[:k]
    return [
        (int(i), int(h), float(scores[i, h]))
        for i, h in zip(*np.unravel_index(order, scores.shape))
    ]
