"""Named activations: a cache of every one, and hooks that read or replace them (patching).

The names are TransformerLens's hook names where the two models line up, so code and notebooks
move between them (pre-norm models; `hook_resid_mid` needs one):

    hook_embed, hook_pos_embed                  token / learned position embedding  (B, L, D)
    blocks.{l}.hook_resid_pre                   residual stream entering block l    (B, L, D)
    blocks.{l}.ln1.hook_out                     attention's input (after its norm)  (B, L, D)
    blocks.{l}.attn.hook_q / hook_k / hook_v    projections, per head (before RoPE) (B, L, H, hd)
    blocks.{l}.attn.hook_pattern                attention weights (read only)       (B, H, L, S)
    blocks.{l}.attn.hook_z                      weighted values, per head           (B, L, H, hd)
    blocks.{l}.hook_attn_out                    attention's output projection       (B, L, D)
    blocks.{l}.hook_resid_mid                   after attention's residual add      (B, L, D)
    blocks.{l}.hook_mlp_in                      MLP input (after its norm)          (B, L, D)
    blocks.{l}.mlp.hook_pre                     pre-activation (SwiGLU: the gate)   (B, L, F)
    blocks.{l}.mlp.hook_pre_linear              SwiGLU's up projection              (B, L, F)
    blocks.{l}.mlp.hook_post                    hidden activation, down's input     (B, L, F)
    blocks.{l}.hook_mlp_out                     MLP output                          (B, L, D)
    blocks.{l}.hook_resid_post                  residual stream leaving block l     (B, L, D)
    ln_final.hook_out                           final norm's output                 (B, L, D)

(TransformerLens's `*.hook_normalized` is a norm's output before its weight and bias, which it
folds into the next layer; the `hook_out` names above are after them, as the model computes.)

They come from the model's own code: for the length of a `hooked` block, modules are wrapped
from the outside (a wrapper passes a module's input or output through the hooks) and put back
afterwards, so `model.py` carries no interpretability branches. Attention runs written out
(`output_attentions`) so the pattern exists; every hooked run takes that same path, so a run that
patches A's activations into A reproduces A bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn

from ..model import Transformer

Hook = Callable[[mx.array], mx.array | None]  # gets the activation; returns a replacement or None


class _Point(nn.Module):
    """Wraps a module: its first input passes through hook `name_in`, its output (the first of a
    tuple) through `name_out`, and a tuple's second item through `name_extra` (read only).

    heads > 0 shows a (..., heads * hd) activation to the hooks as (..., heads, hd).
    """

    def __init__(self, inner, run, name_in=None, name_out=None, heads=0, name_extra=None):
        super().__init__()
        self.inner = inner
        self._run, self._heads = run, heads
        self._names = (name_in, name_out, name_extra)

    def __getattr__(self, key):
        try:
            return super().__getattr__(key)
        except AttributeError:  # e.g. the tied LM head reads `embed_tokens.weight`
            if "inner" not in self:
                raise
            return getattr(self["inner"], key)

    def __call__(self, x, *args, **kwargs):
        name_in, name_out, name_extra = self._names
        if name_in:
            x = self._run(name_in, x, self._heads)
        y = self.inner(x, *args, **kwargs)
        if isinstance(y, tuple):
            first = self._run(name_out, y[0], self._heads) if name_out else y[0]
            if name_extra and y[1] is not None:
                self._run(name_extra, y[1], 0, read_only=True)
            return (first, *y[1:])
        return self._run(name_out, y, self._heads) if name_out else y


def hook_names(model: Transformer) -> list[str]:
    """Every hook name of `model`."""
    return [n for _, _, w in _wrappers(model, None) for n in w._names if n]


def _wrappers(model: Transformer, run) -> list[tuple[object, str | int, _Point]]:
    """(owner, attribute or list index, wrapper) for every hook point of `model`."""
    cfg = model.config
    pre = cfg.norm_position == "pre"
    out = [(model, "embed_tokens", _Point(model.embed_tokens, run, name_out="hook_embed"))]
    if cfg.position_encoding == "learned":
        positions = _Point(model.embed_positions, run, name_out="hook_pos_embed")
        out.append((model, "embed_positions", positions))
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    for i, layer in enumerate(model.layers):
        b = f"blocks.{i}"
        attn, mlp = layer.attn, layer.mlp
        out += [
            (model.layers, i, _Point(layer, run, f"{b}.hook_resid_pre", f"{b}.hook_resid_post")),
            (layer, "attn", _Point(attn, run, f"{b}.ln1.hook_out" if pre else None,
                                   f"{b}.hook_attn_out", name_extra=f"{b}.attn.hook_pattern")),
            (attn, "q_proj", _Point(attn.q_proj, run, name_out=f"{b}.attn.hook_q", heads=H)),
            (attn, "k_proj", _Point(attn.k_proj, run, name_out=f"{b}.attn.hook_k", heads=K)),
            (attn, "v_proj", _Point(attn.v_proj, run, name_out=f"{b}.attn.hook_v", heads=K)),
            (attn, "o_proj", _Point(attn.o_proj, run, name_in=f"{b}.attn.hook_z", heads=H)),
            (layer, "mlp", _Point(mlp, run, f"{b}.hook_mlp_in", f"{b}.hook_mlp_out")),
            (mlp, "down_proj", _Point(mlp.down_proj, run, name_in=f"{b}.mlp.hook_post")),
        ]  # fmt: skip
        if mlp.swiglu:
            out.append((mlp, "gate_proj", _Point(mlp.gate_proj, run, name_out=f"{b}.mlp.hook_pre")))
            up = f"{b}.mlp.hook_pre_linear"
        else:
            up = f"{b}.mlp.hook_pre"
        out.append((mlp, "up_proj", _Point(mlp.up_proj, run, name_out=up)))
        if pre:  # the MLP's norm reads the residual stream between attention and MLP
            out.append((layer, "mlp_norm", _Point(layer.mlp_norm, run, f"{b}.hook_resid_mid")))
    if cfg.final_norm:
        out.append((model, "norm", _Point(model.norm, run, name_out="ln_final.hook_out")))
    return out


class Hooks:
    """What a hooked run does at each name: functions that may replace the activation, and the
    names whose (final) values it keeps in `cache`."""

    def __init__(self, hooks: dict[str, Hook | Sequence[Hook]] | None = None, cache=()):
        self.hooks = {k: list(v) if isinstance(v, (list, tuple)) else [v]
                      for k, v in (hooks or {}).items()}  # fmt: skip
        self.keep = set(cache)
        self.cache: dict[str, mx.array] = {}

    def __call__(self, name: str, x: mx.array, heads: int, read_only: bool = False) -> mx.array:
        shape = x.shape
        if heads:
            x = x.reshape(*shape[:-1], heads, shape[-1] // heads)
        for fn in self.hooks.get(name, ()):
            y = fn(x)
            if y is not None:
                if read_only:
                    raise ValueError(f"{name} is read only here (patch hook_z or hook_q/k/v)")
                if y.shape != x.shape:
                    raise ValueError(f"hook on {name} returned {y.shape}, expected {x.shape}")
                x = y
        if name in self.keep:
            self.cache[name] = x
        return x.reshape(shape) if heads else x


@contextlib.contextmanager
def hooked(model: Transformer, hooks: Hooks) -> Iterator[Hooks]:
    """Within the block, `model`'s forward passes run `hooks`; the module tree is put back after."""
    unknown = (set(hooks.hooks) | hooks.keep) - set(hook_names(model))
    if unknown:
        raise ValueError(
            f"unknown hook name(s) {sorted(unknown)}; hook_names(model) lists the names"
        )
    installed = []
    try:
        for owner, attr, wrapper in _wrappers(model, hooks):
            if isinstance(owner, list):
                owner[attr] = wrapper
            else:
                setattr(owner, attr, wrapper)
            installed.append((owner, attr, wrapper.inner))
        yield hooks
    finally:
        for owner, attr, inner in reversed(installed):
            if isinstance(owner, list):
                owner[attr] = inner
            else:
                setattr(owner, attr, inner)


def run_with_hooks(
    model: Transformer, ids: mx.array, hooks: dict[str, Hook | Sequence[Hook]] | None = None
) -> mx.array:
    """Logits (B, L, V) of `ids` with `hooks` reading or replacing activations by name."""
    return run_with_cache(model, ids, hooks, names=())[0]


def run_with_cache(
    model: Transformer,
    ids: mx.array,
    hooks: dict[str, Hook | Sequence[Hook]] | None = None,
    names: Sequence[str] | None = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """Logits and the activations named `names` (default: every one), evaluated.

    With `hooks`, the cache holds the values after the hooks (what the rest of the model saw).
    """
    h = Hooks(hooks, hook_names(model) if names is None else names)
    with hooked(model, h):
        logits = model.forward(ids, output_attentions=True).logits
    mx.eval(logits, h.cache)
    return logits, h.cache


def patch(
    source: mx.array,
    positions: Sequence[int] | mx.array | None = None,
    heads: Sequence[int] | None = None,
) -> Hook:
    """A hook that replaces the activation with `source`'s values (a run's cached activation, B=1
    broadcasts) at `positions` (default all), and for per-head names only at `heads`.

    positions may also be a boolean (B, L) array: a different set of positions per row, for many
    patches in one batched run.
    """

    def fn(x: mx.array) -> mx.array:
        if positions is None and heads is None:
            return mx.broadcast_to(source, x.shape)
        keep = mx.ones(x.shape[:2], dtype=mx.bool_)
        if isinstance(positions, mx.array) and positions.dtype == mx.bool_:
            keep = mx.broadcast_to(positions, x.shape[:2])
        elif positions is not None:
            if not all(-x.shape[1] <= p < x.shape[1] for p in positions):
                raise ValueError(f"positions {list(positions)} outside 0..{x.shape[1] - 1}")
            hit = mx.zeros((x.shape[1],), dtype=mx.bool_)
            hit[mx.array(list(positions))] = True
            keep = keep & hit
        keep = keep.reshape(*keep.shape, *([1] * (x.ndim - 2)))  # (B, L, 1[, 1])
        if heads is not None:
            if x.ndim != 4:
                raise ValueError("heads= needs a per-head activation (hook_z, hook_q/k/v)")
            if not all(0 <= h < x.shape[2] for h in heads):
                raise ValueError(f"heads {list(heads)} outside 0..{x.shape[2] - 1}")
            hit = mx.zeros((x.shape[2],), dtype=mx.bool_)
            hit[mx.array(list(heads))] = True
            keep = keep & hit[:, None]
        return mx.where(keep, source, x)

    return fn
