"""`mlx-transformer verify`: passes on a faithful export, fails (exit 1) on a tampered one or on
the export of another checkpoint at every precision, refuses options that cannot work (exit 2).

Budgets against trained models (matched and mismatched pairs) are in test_onnx_precision.py.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import fingerprint
from onnx import TensorProto, helper
from test_model import CONFIGS, random_model, tiny_config

from export import export_onnx
from export.contract import model_file
from export.dequantize import stored_weights
from export.weights import read_checkpoint
from mlx_transformer.checkpoint.mlx_io import save_checkpoint
from mlx_transformer.cli import main
from mlx_transformer.errors import UserError
from mlx_transformer.verify import BUDGETS, verify

WEIGHTS_CHECK = "weights equal the checkpoint"
SCALED = "layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = random_model(tiny_config(**CONFIGS["rope-traditional-mqa"]))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), model)


@pytest.fixture(scope="module")
def scaled_ckpt(ckpt, tmp_path_factory):
    """The same checkpoint with one MLP matrix multiplied by -3."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path_factory.mktemp("scaled") / "ckpt"
    shutil.copytree(ckpt, folder)
    weights = load_file(folder / "model.safetensors")
    weights[SCALED] = weights[SCALED] * np.float32(-3)
    save_file(weights, folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def exports(ckpt, tmp_path_factory):
    """precision -> the checkpoint's export (portable), made once."""
    root = tmp_path_factory.mktemp("exports")
    for precision in BUDGETS:
        export_onnx(ckpt, root / precision, precision=precision, measure=False)
    return {precision: root / precision for precision in BUDGETS}


@pytest.mark.parametrize("flavour", ["portable", "ort"])
def test_verify_passes_and_writes_reports(ckpt, flavour, tmp_path):
    export_onnx(ckpt, tmp_path / "onnx", flavour=flavour)
    report = verify(ckpt, tmp_path / "onnx", tokens=16)
    assert report["ok"], [r for r in report["checks"] if r["ok"] is False]
    checks = {(r["check"], r["provider"]): r for r in report["checks"]}
    cpu = "CPUExecutionProvider"
    assert checks[("placement", cpu)]["status"] == "full"
    assert checks[("greedy tokens", cpu)]["greedy_match"] == "16/16"
    assert checks[("prefill, empty past", cpu)]["max_abs_error"] < 1e-4
    assert (("onnx.reference evaluator", "-") in checks) == (flavour == "portable")
    weights = checks[(WEIGHTS_CHECK, "-")]
    n = len(read_checkpoint(ckpt)[1].arrays)
    assert (weights["tensors"], weights["stored_as"]) == (n, {"float32": n})
    assert weights["max_abs_error"] == 0.0  # float32 weights are the checkpoint's, bit for bit
    assert report["budget"]["atol"] == 1e-4 and report["budget"]["greedy_exact"] is True
    assert json.loads((tmp_path / "onnx/verify.json").read_text())["ok"]
    md = (tmp_path / "onnx/verify.md").read_text()
    assert "| greedy tokens | CPUExecutionProvider | yes |" in md
    assert "Budget (fp32 against the checkpoint): atol=0.0001, rtol=0.001" in md


def test_verify_catches_a_wrong_weight(ckpt, tmp_path, capsys):
    out = tmp_path / "onnx"
    export_onnx(ckpt, out)
    proto = onnx.load(out / model_file("fp32"))
    for t in proto.graph.initializer:
        if t.name == "layers.1.mlp.down_proj.weight.T":
            value = onnx.numpy_helper.to_array(t) * np.float32(1.01)
            t.CopyFrom(onnx.numpy_helper.from_array(value, t.name))
    onnx.save(proto, out / model_file("fp32"))
    assert main(["verify", str(ckpt), str(out), "--tokens", "8"]) == 1
    failed = {
        r["check"]
        for r in json.loads((out / "verify.json").read_text())["checks"]
        if r["ok"] is False
    }
    assert {WEIGHTS_CHECK, "prefill, empty past"} <= failed
    assert "**FAIL**" in capsys.readouterr().out


# -- the weight check at every precision ----------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_weight_check_covers_every_precision(precision, ckpt, scaled_ckpt, exports, tmp_path):
    """Every checkpoint tensor is found and compared, quantized matrices dequantized; a matrix
    scaled by -3 is named, whichever side of the pair it is on."""
    kinds = {"fp16": "float16", "int8": "int8", "int4": "int4 (MatMulNBits, block 32)"}
    report = verify(ckpt, exports[precision], providers=["cpu"], tokens=4, report=tmp_path / "a")
    weights = next(r for r in report["checks"] if r["check"] == WEIGHTS_CHECK)
    assert weights["ok"], weights
    n = len(read_checkpoint(ckpt)[1].arrays)
    assert (weights["tensors"], weights["missing"], weights["outside_tolerance"]) == (n, 0, 0)
    assert kinds[precision] in weights["stored_as"]
    if precision != "fp16":  # within half a step, or one step where the quantizer saturated
        assert weights["max_error_in_steps"] <= 1.0

    other = tmp_path / "scaled-export"
    export_onnx(scaled_ckpt, other, precision=precision, measure=False)
    for ck, export in ((scaled_ckpt, exports[precision]), (ckpt, other)):
        report = verify(ck, export, providers=["cpu"], tokens=4, report=tmp_path / "b")
        weights = next(r for r in report["checks"] if r["check"] == WEIGHTS_CHECK)
        assert not report["ok"] and weights["ok"] is False
        assert weights["outside_tolerance"] == f"1: {SCALED}.T", weights


def through_onnxruntime(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    """The weight of one quantized MatMul as onnxruntime computes it: identity @ W."""
    inits = {t.name: t for t in model.graph.initializer}
    used = [name for name in node.input[1:] if name in inits]
    if node.op_type == "MatMulNBits":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        K, attrs["accuracy_level"] = attrs["K"], 0  # float activations: exact for the identity
        nodes = [helper.make_node(node.op_type, ["A", *node.input[1:]], ["Y"], **attrs)]
        nodes[0].domain = "com.microsoft"
    else:  # quantize_dynamic's MatMulInteger and the Muls by the two scales after it
        K, scale = inits[node.input[1]].dims[0], node.input[1].replace("_quantized", "_scale")
        used.append(scale)
        nodes = [
            helper.make_node("DynamicQuantizeLinear", ["A"], ["Aq", "As", "Az"]),
            helper.make_node("MatMulInteger", ["Aq", node.input[1], "Az", node.input[3]], ["I"]),
            helper.make_node("Cast", ["I"], ["F"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["As", scale], ["S"]),
            helper.make_node("Mul", ["F", "S"], ["Y"]),
        ]
    graph = helper.make_graph(
        nodes,
        "one_weight",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [K, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [inits[name] for name in dict.fromkeys(used)],
    )
    one = helper.make_model(graph, opset_imports=list(model.opset_import))
    session = ort.InferenceSession(one.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"A": np.eye(K, dtype=np.float32)})[0]


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_dequantized_weights_are_what_onnxruntime_multiplies_by(precision, exports):
    model = onnx.load(exports[precision] / model_file(precision))
    stored = dict(stored_weights(model))
    nodes = [n for n in model.graph.node if n.op_type in ("MatMulInteger", "MatMulNBits")]
    assert len(nodes) == 13  # 6 per layer and the LM head
    for node in nodes:
        name = node.input[1].rsplit("_", 1)[0]  # w_quantized / w_Q4 / w_Q8 -> w
        np.testing.assert_allclose(
            stored[name].values, through_onnxruntime(model, node), rtol=1e-6, atol=1e-7
        )


@pytest.mark.parametrize(
    "dtype, axis, block",
    [(TensorProto.INT8, None, 0), (TensorProto.UINT8, 1, 0), (TensorProto.INT4, 0, 16)],
)
def test_dequantize_linear_weights_match_onnxruntime(dtype, axis, block):
    """QDQ graphs: per tensor, per axis (uint8 with zero points) and blocked int4."""
    rng = np.random.default_rng(0)
    low, high = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255)}.get(dtype, (-8, 7))
    q = rng.integers(low, high + 1, (32, 8))
    shape = [] if axis is None else [8] if not block else [32 // block, 8]
    scale = rng.uniform(0.01, 0.1, shape).astype(np.float32)
    zero = rng.integers(low, high + 1, shape)
    attrs = {} if axis is None else {"axis": axis, **({"block_size": block} if block else {})}
    inits = [
        helper.make_tensor("w_quantized", dtype, [32, 8], q.ravel().tolist()),
        onnx.numpy_helper.from_array(scale, "w_scale"),
        helper.make_tensor("w_zero_point", dtype, shape, zero.ravel().tolist()),
    ]
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", [t.name for t in inits], ["w"], **attrs)],
        "qdq",
        [],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    want = ort.InferenceSession(model.SerializeToString()).run(None, {})[0]
    stored = dict(stored_weights(model))["w"]
    np.testing.assert_allclose(stored.values, want, rtol=1e-6)
    assert np.all(stored.tolerance(want) > 0) and np.all(stored.step > 0)


# -- options --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    [
        ["--tokens", "-1"],
        ["--tokens", "0"],
        ["--decode-steps", "0"],
        ["--provider", "nonesuch"],
        ["--report", "FILE"],
    ],
)
def test_verify_refuses_options_that_cannot_work(option, ckpt, exports, tmp_path, capsys):
    """One line on stderr, exit 2, nothing written: before, --tokens -1 passed comparing nothing."""
    out = exports["fp32"]
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    option = [str(notes) if arg == "FILE" else arg for arg in option]
    before = fingerprint(out, tmp_path, ckpt, folders=False)
    assert main(["verify", str(ckpt), str(out), *option]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mlx-transformer verify: error: "), err
    assert "Traceback" not in err
    assert fingerprint(out, tmp_path, ckpt, folders=False) == before


def test_verify_api_refuses_non_positive_tokens(ckpt, exports):
    for options in ({"tokens": -1}, {"tokens": 0}, {"decode_steps": -3}, {"tokens": 2.5}):
        with pytest.raises(UserError, match="must be a whole number of at least 1"):
            verify(ckpt, exports["fp32"], **options)
