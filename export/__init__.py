"""The ONNX side: read a checkpoint with numpy, build the graph, quantize, run it.

Never imports MLX, directly or indirectly (a test checks). Modules: contract (the folder's file
names, io.json and the graph's IO names); weights (checkpoint reader) → graph, layers, builder
(the graph) → quantize → exporter (API and `export` CLI); webgpu_plugin (a private WebGPU
install) → providers (execution providers) → session (one model, KV cache) → runtime
(`onnx-generate`, deployment). quantize measures with runtime's generator. verify_checks: the
MLX-free half of `mlx-transformer verify` (budgets, file and weight checks, report).
"""

from __future__ import annotations


def export_onnx(*args, **kwargs) -> dict:
    """See `export.exporter.export_onnx` (imported lazily: onnx is not needed to run a model)."""
    from .exporter import export_onnx as export

    return export(*args, **kwargs)
