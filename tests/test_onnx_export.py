"""ONNX export parity: every architecture switch × both flavours against MLX and the float64
reference, through the production path (save_checkpoint → export_onnx → export.session)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import onnx
import pytest
from test_model import CONFIGS, random_model, tiny_config

import reference
from export import export_onnx
from export.builder import build_model
from export.contract import IO_FILE, LOGITS, external_data, feeds, io_table, model_file
from export.session import OnnxModel, left_pad, positions_from_mask
from export.weights import read_checkpoint
from mlx_transformer.checkpoint.format import CheckpointError
from mlx_transformer.checkpoint.mlx_io import save_checkpoint
from mlx_transformer.errors import UserError
from mlx_transformer.model import make_cache

ATOL, RTOL = 1e-4, 1e-3  # fp32 logits
FLAVOURS = ["portable", "ort"]
_cache: dict = {}


def exported(name: str, flavour: str, tmp_path_factory, **overrides):
    """(MLX model, checkpoint folder, OnnxModel) for a CONFIGS entry, built once per session."""
    key = (name, flavour, tuple(sorted(overrides.items())))
    if key not in _cache:
        model_key = (name, tuple(sorted(overrides.items())))
        if model_key not in _cache:
            model = random_model(tiny_config(**{**CONFIGS[name], **overrides}))
            ckpt = save_checkpoint(tmp_path_factory.mktemp(f"ckpt-{name}"), model)
            _cache[model_key] = (model, ckpt)
        model, ckpt = _cache[model_key]
        out = tmp_path_factory.mktemp(f"onnx-{name}-{flavour}")
        export_onnx(ckpt, out, flavour=flavour)
        _cache[key] = (model, ckpt, OnnxModel(out))
    return _cache[key]


def left_padded(rng, lengths, vocab):
    return left_pad([rng.integers(0, vocab, n) for n in lengths])


def assert_logits_close(got, want, where=None):
    if where is not None:
        got, want = got[where], want[where]
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


@pytest.fixture(params=[(c, f) for c in CONFIGS for f in FLAVOURS], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request, tmp_path_factory):
    return exported(*request.param, tmp_path_factory)


def test_padded_prefill_matches_mlx_reference_and_cache(case):
    """Ragged left-padded batch, empty past: logits and present k/v at the real positions."""
    model, ckpt, onnx_model = case
    cfg = model.config
    ids, mask = left_padded(np.random.default_rng(0), [17, 9, 13], cfg.vocab_size)
    logits, present = onnx_model(ids, mask)
    cache = make_cache(model)
    want = np.array(model(mx.array(ids), attention_mask=mx.array(mask), cache=cache))
    real = mask.astype(bool)
    assert_logits_close(logits, want, real)
    expected, _ = reference.forward(cfg, read_checkpoint(ckpt)[1].arrays, ids, mask)
    assert_logits_close(logits, expected, real)
    for i, c in enumerate(cache):  # the cache holds k after rotary, v as is
        for got, mlx_value in zip(present[2 * i : 2 * i + 2], c.state):
            mlx_value = np.array(mlx_value[..., : ids.shape[1], :])
            np.testing.assert_allclose(
                got.transpose(0, 2, 1, 3)[real], mlx_value.transpose(0, 2, 1, 3)[real], atol=1e-5
            )


def test_prefill_then_decode_equals_full_forward(case):
    """Prefill, a multi-token chunk after past (GQA's batch limit), then single-token steps."""
    model, _, onnx_model = case
    ids, mask = left_padded(np.random.default_rng(1), [21, 14], model.config.vocab_size)
    full = np.array(model(mx.array(ids), attention_mask=mx.array(mask)))
    pieces, past = [], None
    for start, stop in [(0, 8), (8, 12)] + [(t, t + 1) for t in range(12, 21)]:
        logits, past = onnx_model(ids[:, start:stop], mask[:, :stop], past)
        pieces.append(logits)
    assert past[0].shape[2] == 21
    assert_logits_close(np.concatenate(pieces, axis=1), full, mask.astype(bool))


def test_batch_and_length_vary_at_run_time(case):
    """One session, several (batch, length) shapes; each row equals that row run alone."""
    model, _, onnx_model = case
    rng = np.random.default_rng(2)
    for lengths in ([5], [3, 11, 7, 1], [30, 2]):
        ids, mask = left_padded(rng, lengths, model.config.vocab_size)
        logits, _ = onnx_model(ids, mask)
        for i, n in enumerate(lengths):
            alone, _ = onnx_model(ids[i : i + 1, -n:], mask[i : i + 1, -n:])
            np.testing.assert_allclose(logits[i, -n:], alone[0], atol=2e-5)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_maximum_context(flavour, tmp_path_factory):
    model, _, onnx_model = exported("llama-gqa", flavour, tmp_path_factory)
    T = model.config.max_position_embeddings
    ids = np.random.default_rng(3).integers(0, model.config.vocab_size, (1, T))
    logits, _ = onnx_model(ids, np.ones((1, T), np.int64))
    assert_logits_close(logits, np.array(model(mx.array(ids))))
    with pytest.raises(UserError, match="exceeds the model's context"):
        onnx_model(np.zeros((1, T + 1), np.int64), np.ones((1, T + 1), np.int64))


@pytest.mark.parametrize("name", ["llama-gqa", "paper"])
def test_reference_evaluator_agrees(name, tmp_path_factory):
    """onnx.reference runs the portable graph as a second, independent implementation."""
    from onnx.reference import ReferenceEvaluator

    model, ckpt, onnx_model = exported(name, "portable", tmp_path_factory)
    ids, mask = left_padded(np.random.default_rng(4), [7, 4], model.config.vocab_size)
    inputs = feeds(ids, mask, positions_from_mask(mask, 7), onnx_model.empty_past(2))
    evaluator = ReferenceEvaluator(str(onnx_model.dir / onnx_model.io["model"]))
    logits = evaluator.run([LOGITS], inputs)[0]
    expected, _ = reference.forward(model.config, read_checkpoint(ckpt)[1].arrays, ids, mask)
    assert_logits_close(logits, expected, mask.astype(bool))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_graph_is_valid_and_io_is_declared(flavour, tmp_path_factory):
    model, _, onnx_model = exported("llama-gqa", flavour, tmp_path_factory)
    proto = onnx.load(onnx_model.dir / onnx_model.io["model"])
    onnx.checker.check_model(proto, full_check=True)
    if flavour == "portable":  # onnx cannot infer com.microsoft ops
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    io = json.loads((onnx_model.dir / IO_FILE).read_text())
    inputs, outputs = io_table(model.config)
    names = [i.name for i in proto.graph.input]
    assert names == [x["name"] for x in io["inputs"]] == [n for n, _, _ in inputs]
    assert [o.name for o in proto.graph.output] == [n for n, _, _ in outputs]
    # The contract is the Hugging Face (optimum) layout: spelled out here, and only here.
    assert names[:4] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    assert [n for n, _, _ in outputs[:3]] == ["logits", "present.0.key", "present.0.value"]
    assert io["num_key_value_heads"] == 2 and io["head_dim"] == 8 and io["flavour"] == flavour
    nodes = {n.name: n for n in proto.graph.node}
    q = nodes["/model/layers.0/attn/q_proj/MatMul"]
    assert q.input[1] == "layers.0.attn.q_proj.weight.T"
    ops = {n.op_type for n in proto.graph.node}
    if flavour == "ort":
        assert {"GroupQueryAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization"} <= ops
    else:
        assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    # num_logits_to_keep has a default (0: every position), so clients that build their feeds
    # from onnxruntime's required inputs (optimum, genai, transformers.js) never see it.
    assert names[-1] == "num_logits_to_keep"
    default = {t.name: t for t in proto.graph.initializer}["num_logits_to_keep"]
    value = onnx.numpy_helper.to_array(default)
    assert value.shape == () and value.dtype == np.int64 and value == 0
    required = [i.name for i in onnx_model.session.get_inputs()]
    assert required == names[:-1]


def test_weights_are_used_exactly_and_extra_tensors_rejected(tmp_path, tmp_path_factory):
    model, ckpt, _ = exported("gpt2", "portable", tmp_path_factory)
    config, weights = read_checkpoint(ckpt)
    proto = build_model(config, weights)
    assert weights.unused() == []
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_array_equal(inits["layers.1.mlp.up_proj.weight.T"].T,
                                  np.array(model.layers[1].mlp.up_proj.weight))  # fmt: skip
    # A checkpoint with one more tensor than its config describes is refused.
    from safetensors.numpy import save_file

    arrays = dict(weights.arrays, **{"layers.9.attn.q_proj.weight": np.zeros((2, 2), np.float32)})
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((ckpt / "config.json").read_text())
    save_file(arrays, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor layers.9.attn.q_proj.weight"):
        export_onnx(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_are_read_exactly(dtype, tmp_path):
    model = random_model(tiny_config(**CONFIGS["llama-gqa"]))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, dtype=dtype)
    _, weights = read_checkpoint(ckpt)
    assert weights.dtype == dtype
    for name, value in weights.arrays.items():
        want = np.array(mx.load(str(ckpt / "model.safetensors"))[name].astype(mx.float32))
        np.testing.assert_array_equal(value, want, err_msg=name)
    export_onnx(ckpt, tmp_path / "onnx")
    assert json.loads((tmp_path / "onnx" / IO_FILE).read_text())["checkpoint_dtype"] == dtype


def test_external_data_and_atomic_replacement(tmp_path, tmp_path_factory, monkeypatch):
    model, ckpt, onnx_model = exported("llama-gqa", "ort", tmp_path_factory)
    out = tmp_path / "onnx"
    info = export_onnx(ckpt, out, flavour="ort", external_data_threshold=0)
    assert info["external_data"] and (out / "onnx" / external_data(info["model"])).is_file()
    assert info["model"] == model_file("fp32") == "onnx/model.onnx"
    ids, mask = left_padded(np.random.default_rng(5), [6, 3], model.config.vocab_size)
    np.testing.assert_array_equal(OnnxModel(out)(ids, mask)[0], onnx_model(ids, mask)[0])
    # A failure while writing leaves the previous export untouched.
    import export.exporter

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export.exporter, "to_fp16", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_onnx(ckpt, out, precision="fp16", overwrite=True)
    assert json.loads((out / IO_FILE).read_text())["precision"] == "fp32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def _hashes(root):
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("head_dim", [4, 12])
def test_ort_flavour_refuses_head_sizes_groupqueryattention_cannot_run(head_dim, tmp_path, capsys):
    """GroupQueryAttention rejects head sizes that are not a multiple of 8 when it runs; the
    export says so in one line and leaves an earlier export at OUT as it was."""
    from mlx_transformer.cli import main

    model = random_model(tiny_config(hidden_size=4 * head_dim, **CONFIGS["llama-gqa"]))
    ckpt = save_checkpoint(tmp_path / "ckpt", model)
    out = tmp_path / "onnx"
    assert main(["export", str(ckpt), str(out)]) == 0  # portable runs any head size
    ids, mask = left_padded(np.random.default_rng(1), [5, 3], model.config.vocab_size)
    want = np.array(model(mx.array(ids), attention_mask=mx.array(mask)))
    assert_logits_close(OnnxModel(out)(ids, mask)[0], want, mask.astype(bool))
    before = _hashes(tmp_path)
    capsys.readouterr()
    assert main(["export", str(ckpt), str(out), "--flavour", "ort", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "multiple of 8" in err and f"is {head_dim}: use --flavour portable" in err, err
    assert _hashes(tmp_path) == before
