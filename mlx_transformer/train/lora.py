"""LoRA: low-rank adapters on a frozen model, saved apart from it, and fused back into it.

    y = W x + b + (alpha / r) * B(A(dropout(x)))     A: (in, r) random, B: (r, out) zeros

B starts at zero, so an adapted model starts out exactly as its base. An adapter folder holds
`adapters.safetensors` (keys `layers.{i}.attn.q_proj.lora_a`, ...) and `adapter_config.json`
(rank, alpha, dropout, targets, layers, and the base model it was trained on). The `fuse`
command (`train.fuse`) turns adapters and their base model back into a plain checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .. import atomic
from ..checkpoint.format import CheckpointError, read_safetensors_header
from ..errors import UserError
from ..model import Linear, Transformer

ADAPTERS_FILE = "adapters.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """An `nn.Linear` (frozen by the caller) plus a trainable low-rank update."""

    def __init__(self, linear: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        out_dims, in_dims = linear.weight.shape
        self.linear = linear
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        bound = 1 / math.sqrt(in_dims)  # Kaiming-uniform-like, as mlx-lm and peft
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    def __call__(self, x: mx.array) -> mx.array:
        update = (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return self.linear(x) + (self.scale * update).astype(x.dtype)

    def fused(self) -> nn.Linear:
        """A plain Linear with W + scale * (A B)ᵀ folded in (in float32, then W's dtype)."""
        weight = self.linear.weight
        delta = self.scale * (self.lora_a.astype(mx.float32) @ self.lora_b.astype(mx.float32)).T
        out_dims, in_dims = weight.shape
        has_bias = "bias" in self.linear
        linear = Linear(in_dims, out_dims, bias=has_bias)
        linear.weight = (weight.astype(mx.float32) + delta).astype(weight.dtype)
        if has_bias:
            linear.bias = self.linear.bias
        return linear


def _target_modules(model: Transformer, targets: list[str], num_layers: int | None):
    """(parent module, attribute name) of each projection to adapt, last `num_layers` layers."""
    layers = model.layers if num_layers is None else model.layers[-num_layers:]
    found = []
    for layer in layers:
        for name in targets:
            parent = layer.attn if name in ATTENTION_TARGETS else layer.mlp
            if name in parent:
                found.append((parent, name))
    if not found:
        raise UserError(
            f"none of the LoRA targets {', '.join(targets)} exist in this model "
            "(gate_proj only exists with SwiGLU)"
        )
    return found


def apply_lora(
    model: Transformer,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: list[str] | tuple[str, ...] = ("q_proj", "v_proj"),
    num_layers: int | None = None,
) -> dict:
    """Freeze `model` and wrap the target projections in LoRALinear (in place).

    Returns:
        The adapter configuration (what `adapter_config.json` records).
    """
    model.freeze()
    for parent, name in _target_modules(model, list(targets), num_layers):
        if isinstance(parent[name], LoRALinear):
            raise UserError(f"{name} already carries an adapter")
        parent[name] = LoRALinear(parent[name], rank, alpha, dropout)
    return {
        "rank": rank,
        "alpha": alpha,
        "dropout": dropout,
        "targets": list(targets),
        "num_layers": num_layers,
    }


def adapter_weights(model: Transformer) -> dict[str, mx.array]:
    """The adapters' tensors by module path (what adapters.safetensors holds)."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b"))}


def save_adapters(folder: Path, model: Transformer, config: dict) -> None:
    """Write adapters.safetensors and adapter_config.json into `folder` (the caller makes it
    atomic, e.g. inside `atomic.write_folder`)."""
    mx.save_safetensors(str(folder / ADAPTERS_FILE), adapter_weights(model), {"format": "mlx"})
    atomic.write_text(folder / ADAPTER_CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def read_adapter_config(folder: str | Path) -> dict:
    path = Path(folder) / ADAPTER_CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(
            f"{folder}: not an adapter folder (no {ADAPTER_CONFIG_FILE}); pass the run's "
            "latest/ or a checkpoints/step_*/ folder of a --lora run"
        ) from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def load_adapters(model: Transformer, folder: str | Path) -> dict:
    """Wrap `model` as its adapter config says and load the adapter tensors (strict).

    Returns:
        The adapter configuration.
    """
    config = read_adapter_config(folder)
    apply_lora(
        model,
        config["rank"],
        config["alpha"],
        config.get("dropout", 0.0),
        config["targets"],
        config.get("num_layers"),
    )
    path = Path(folder) / ADAPTERS_FILE
    read_safetensors_header(path)
    weights = mx.load(str(path))
    expected = {k: v.shape for k, v in adapter_weights(model).items()}
    for name in sorted(set(expected) | set(weights)):
        if name not in weights:
            raise CheckpointError(f"{path}: missing adapter tensor {name}")
        if name not in expected:
            raise CheckpointError(f"{path}: adapter tensor {name} does not fit this model")
        if tuple(weights[name].shape) != tuple(expected[name]):
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(weights[name].shape)}, the model expects "
                f"{tuple(expected[name])} (was it trained on another base model?)"
            )
    model.update(tree_unflatten(list(weights.items())))
    mx.eval(model.parameters())
    return config


def fuse_lora(model: Transformer) -> Transformer:
    """Replace every LoRALinear by its fused Linear (in place); the model is unfrozen."""
    for _, module in model.named_modules():
        for name, child in list(module.children().items()):
            if isinstance(child, LoRALinear):
                module[name] = child.fused()
    model.unfreeze()
    mx.eval(model.parameters())
    return model
