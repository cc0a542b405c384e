"""The torch-onnx peer of scripts/bench_onnx.py: a Hugging Face model → `torch.onnx.export`.

The transformers model is wrapped so that the exported graph has our IO convention (input_ids,
attention_mask, position_ids, past_key_values.{i}.key/value → logits, present.{i}.key/value),
and an io.json with the keys the runtime needs (see `export.contract`) is written next to it, so
`export.runtime` loads it like our own exports.
`torch_export_parity` checks the graph against transformers itself.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def past_key_values_wrapper(model):
    """A torch module with our flat IO around a transformers causal LM.

    The padding mask (B, S) becomes a 4D additive mask here, in traced tensor ops: transformers'
    own mask code branches on Python ints (sizes, "is the mask all ones"), which the TorchScript
    tracer freezes at the example's shapes. Same rule as ours: causal, no padded keys, and each
    query sees itself (so a padded row is never fully masked).
    """
    import torch
    from transformers import DynamicCache

    class PastKeyValues(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            S, L = attention_mask.shape[1], input_ids.shape[1]
            k = torch.arange(S)[None, :]  # (1, S)
            q = k[:, S - L :].transpose(0, 1)  # (L, 1): positions of the queries
            keep = ((k <= q)[None] & attention_mask[:, None, :].bool()) | (k == q)[None]
            bias = torch.where(keep, 0.0, torch.finfo(torch.float32).min)[:, None]  # (B,1,L,S)
            cache = DynamicCache(list(zip(past[0::2], past[1::2])))
            out = self.model(
                input_ids=input_ids,
                attention_mask=bias,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            present = [
                t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)
            ]
            return (out.logits, *present)

    return PastKeyValues().eval()  # eval: export restores the wrapper's mode on the model


def hf_dims(hf_config) -> tuple[int, int, int, int]:
    """(layers, key/value heads, head size, context) of a transformers GPT-2 or Llama config."""
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return hf_config.num_hidden_layers, kv_heads, head_dim, hf_config.max_position_embeddings


def export_torch_onnx(hf_dir: str | Path, out_dir: str | Path, opset: int = 17) -> dict:
    """transformers model in `hf_dir` → `out_dir`/model.onnx + io.json (OnnxGenerator loads it).

    Returns:
        The io.json written, with the export time.
    """
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    from export.contract import (
        ATTENTION_MASK,
        INPUT_IDS,
        IO_FILE,
        LOGITS,
        MODEL_FILE,
        PAST,
        POSITION_IDS,
        PRESENT,
        kv_names,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    n_layers, kv_heads, head_dim, context = hf_dims(model.config)
    past_names, present_names = kv_names(PAST, n_layers), kv_names(PRESENT, n_layers)
    dynamic = {
        INPUT_IDS: {0: "batch", 1: "seq"},
        ATTENTION_MASK: {0: "batch", 1: "total_seq"},
        POSITION_IDS: {0: "batch", 1: "seq"},
        LOGITS: {0: "batch", 1: "seq"},
        **{n: {0: "batch", 2: "past_seq"} for n in past_names},
        **{n: {0: "batch", 2: "total_seq"} for n in present_names},
    }
    B, L, P = 2, 3, 4  # example shapes: all different, so no dynamic axis is confused with another
    example = (
        torch.randint(0, model.config.vocab_size, (B, L)),
        torch.ones(B, P + L, dtype=torch.long),
        torch.arange(P, P + L)[None].repeat(B, 1),
        *[torch.zeros(B, kv_heads, P, head_dim) for _ in past_names],
    )
    tic = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about the frozen branches we bypass
        torch.onnx.export(
            past_key_values_wrapper(model),
            example,
            str(out_dir / MODEL_FILE),
            input_names=[INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names],
            output_names=[LOGITS, *present_names],
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,  # the dynamo exporter needs onnxscript, which is not installed
        )
    io = {
        "format": "torch.onnx.export",
        "model": MODEL_FILE,
        "flavour": "torch",
        "exporter": f"torch {torch.__version__} TorchScript, opset {opset}",
        "attn_implementation": model.config._attn_implementation,
        "num_hidden_layers": n_layers,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "context_length": context,
        "vocab_size": model.config.vocab_size,
        "special_tokens": None,
        "export_seconds": round(time.perf_counter() - tic, 2),
    }
    (out_dir / IO_FILE).write_text(json.dumps(io, indent=2) + "\n")
    return io


def torch_export_parity(hf_dir: str | Path, onnx_dir: str | Path, seed: int = 0) -> float:
    """Max |logit difference| of the torch-exported graph vs transformers itself.

    A left-padded batch of two: a prefill, then one decode step fed the graph's own cache.
    """
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from export.session import OnnxModel, positions_from_mask

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    onnx_model = OnnxModel(onnx_dir)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, model.config.vocab_size, (2, 9))
    mask = np.ones((2, 9), np.int64)
    mask[1, :3] = 0  # row 1 is left-padded
    logits, past = onnx_model(ids[:, :-1], mask[:, :-1])
    step, _ = onnx_model(ids[:, -1:], mask, past)
    ours = np.concatenate([logits, step], axis=1)
    with torch.no_grad():
        ref = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions_from_mask(mask, 9)),
        ).logits.numpy()
    real = mask.astype(bool)  # padded positions' logits mean nothing
    return float(np.abs(ours - ref)[real].max())
