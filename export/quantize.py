"""Lower precision for the exported graph, and what it costs against fp32.

- fp16: onnxruntime's float16 converter with float32 IO; norms, softmax, masks and position
  math stay float32 (fp16 overflows in variance sums, and fp16 angles lose whole positions).
- int8: dynamic quantization of every MatMul weight (per tensor, QInt8; per-channel uses 7-bit
  weights there and measured worse). Activations are quantized at run time.
- int4: weight-only MatMulNBits (block 32, symmetric); the LM head at 8 bits, because int4 heads
  degrade small models most (repetition). Embeddings stay float32 in every precision.

`compare` measures a candidate against the fp32 graph on the same tokens: max logit error, the
scale-free `logit_error`, next-token (argmax) agreement, greedy generation agreement
(`OnnxGenerator`) and perplexity. `verify` holds exports to budgets in the same terms.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import onnx

from .runtime import OnnxGenerator

PRECISIONS = ("fp32", "fp16", "int8", "int4")
LM_HEAD = "/model/lm_head/MatMul"

# Ops whose every instance stays float32 in the fp16 graph.
FP32_OPS = [
    "LayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "Softmax",
    "Erf",
    "GroupQueryAttention",  # its softmax
    "RotaryEmbedding",  # its cos/sin tables
]
# Nodes (by path) that stay float32: explicit RMSNorms, positions, masks.
FP32_PATHS = ("norm/", "/model/rotary/", "/model/embed_positions/", "/model/attn_mask/")


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # onnx shape inference does not know com.microsoft ops; without their output types the
    # converter would not put Casts after the blocked ones.
    known = {v.name for v in model.graph.value_info}
    for node in model.graph.node:
        if node.domain == "com.microsoft":
            for name in node.output:
                if name and name not in known:
                    model.graph.value_info.append(
                        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                    )
    keep = [n.name for n in model.graph.node if any(p in n.name for p in FP32_PATHS)]
    keep += [n.name for n in model.graph.node if n.name.endswith(("/Mask", "/attention_bias"))]
    model = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=FP32_OPS, node_block_list=keep
    )
    return topologically_sorted(model)  # the converter appends some Casts after their users


def topologically_sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """Reorder graph nodes so each comes after the producers of its inputs (stable)."""
    graph = model.graph
    ready = {""} | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input at {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
    return model


def to_int8(src: Path, dst: Path, external_data: bool = False) -> None:
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # its "consider pre-processing" warning
    try:
        _quantize_dynamic(src, dst, external_data)
    finally:
        root.setLevel(level)


def _quantize_dynamic(src: Path, dst: Path, external_data: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        src,
        dst,
        weight_type=QuantType.QInt8,
        per_channel=False,
        op_types_to_quantize=["MatMul"],
        use_external_data_format=external_data,
        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def to_int4(model: onnx.ModelProto, block_size: int = 32) -> onnx.ModelProto:
    """MatMulNBits: 4-bit weights except the LM head (8-bit). Needs the onnx-ir package."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    common = dict(block_size=block_size, is_symmetric=True, accuracy_level=4)
    body = MatMulNBitsQuantizer(model, bits=4, nodes_to_exclude=[LM_HEAD], **common)
    body.process()
    head = MatMulNBitsQuantizer(body.model.model, bits=8, nodes_to_include=[LM_HEAD], **common)
    head.process()
    return head.model.model


# -- measuring ------------------------------------------------------------------------------------


def logit_error(got: np.ndarray, want: np.ndarray) -> float:
    """RMS of the logit difference over the RMS of the reference's logits (..., V), both
    centred per position (adding a constant to a position's logits changes no probability)."""

    def centred_rms(x: np.ndarray) -> float:
        x = x.astype(np.float64)
        return float(np.sqrt(np.mean(np.square(x - x.mean(-1, keepdims=True)))))

    return centred_rms(got - want) / max(centred_rms(want), 1e-30)


def _nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean next-token negative log-likelihood of ids (B, T) under logits (B, T, V)."""
    x = logits[:, :-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, ids[:, 1:, None], -1).mean())


def eval_windows(tokens: np.ndarray, context: int, windows: int = 4) -> np.ndarray:
    """Up to `windows` rows of min(context, 128) consecutive tokens."""
    T = min(context, 128, len(tokens))
    n = max(1, min(windows, len(tokens) // T))
    return np.stack([tokens[i * T : (i + 1) * T] for i in range(n)]).astype(np.int64)


def compare(
    reference: Path,
    candidate: Path,
    io: dict,
    tokens: np.ndarray,
    greedy_n: int = 32,
    reference_model: str | None = None,
) -> dict:
    """Errors of the candidate graph against the reference (fp32) graph, on the CPU EP.

    Args:
        reference, candidate: export folders (no io.json needed).
        io: the io.json contents that both graphs share; its "model" is the candidate's path
            in its folder, `reference_model` the reference's (default: the same).
        tokens: evaluation token ids (1-D); cut into windows (`eval_windows`).
    Returns:
        max_abs_logit_error, logit_error, argmax_agreement (next-token, teacher-forced),
        greedy_match (identical greedy tokens before the first difference, of greedy_n),
        perplexities.
    """
    ref_io = {**io, "model": reference_model or io["model"]}
    ref_gen, cand_gen = OnnxGenerator(reference, io=ref_io), OnnxGenerator(candidate, io=io)
    ids = eval_windows(tokens, io["context_length"])
    ref = ref_gen.model(ids, np.ones_like(ids))[0]
    cand = cand_gen.model(ids, np.ones_like(ids))[0]
    prompt = ids[0, : min(8, ids.shape[1])].tolist()
    n = min(greedy_n, io["context_length"] - len(prompt))
    greedy = [
        gen.generate_tokens([prompt], max_tokens=n, stop_at_eos=False)[0].tokens
        for gen in (ref_gen, cand_gen)
    ]
    match = next((i for i, (a, b) in enumerate(zip(*greedy)) if a != b), n)
    ppl_ref, ppl_cand = math.exp(_nll(ref, ids)), math.exp(_nll(cand, ids))
    return {
        "eval_tokens": int(ids.size),
        "max_abs_logit_error": float(np.abs(cand - ref).max()),
        "logit_error": logit_error(cand, ref),
        "logit_scale": float(np.abs(ref).max()),
        "argmax_agreement": float((cand.argmax(-1) == ref.argmax(-1)).mean()),
        "greedy_match": f"{match}/{n}",
        "perplexity_fp32": ppl_ref,
        "perplexity": ppl_cand,
        "perplexity_change": ppl_cand / ppl_ref - 1.0,
    }
