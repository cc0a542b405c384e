"""Execution providers: honest placement reports, and parity on every provider installed here
(CPU always; WebGPU when scripts/install_webgpu_ep.sh or onnxruntime-ep-webgpu is installed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from test_model import CONFIGS, random_model, tiny_config

from export import export_onnx, providers
from export.runtime import OnnxGenerator
from export.session import OnnxModel
from mlx_transformer.checkpoint.mlx_io import save_checkpoint

WEBGPU = "WebGpuExecutionProvider"
HAS_WEBGPU = WEBGPU in providers.available()
NO_WEBGPU = "WebGPU EP not installed: run scripts/install_webgpu_ep.sh"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(model, {flavour: folder}) of a Llama-style random model with context 64."""
    model = random_model(tiny_config(**CONFIGS["llama-gqa"], max_position_embeddings=64))
    ckpt = save_checkpoint(tmp_path_factory.mktemp("ckpt"), model)
    folders = {}
    for flavour in ("portable", "ort"):
        folders[flavour] = tmp_path_factory.mktemp(flavour)
        export_onnx(ckpt, folders[flavour], flavour=flavour)
    return model, folders


def test_cpu_placement_is_full_and_unknown_providers_are_named(exports):
    _, folders = exports
    model = OnnxModel(folders["ort"])
    assert model.placement.status == "full" and model.device is None
    assert model.placement.nodes["CPUExecutionProvider"] > 0
    with pytest.raises(providers.ProviderError, match="'nosuch' is not available here"):
        OnnxModel(folders["ort"], provider="nosuch")


def test_placement_status_from_node_counts():
    p = providers.Placement(WEBGPU, [WEBGPU], {WEBGPU: 40, "CPUExecutionProvider": 3}, ["Shape"])
    assert p.status == "partial"
    assert providers.Placement(WEBGPU, [], {"CPUExecutionProvider": 9}).status == "none"
    assert providers.Placement(WEBGPU, [], {WEBGPU: 9}).status == "full"


@pytest.mark.parametrize(
    "provider",
    ["cpu", pytest.param("webgpu", marks=pytest.mark.skipif(not HAS_WEBGPU, reason=NO_WEBGPU))],
)
@pytest.mark.parametrize("flavour", ["portable", "ort"])
def test_parity_on_provider(exports, flavour, provider):
    """Padded prefill of 40 tokens (past GQA's 32-token WebGPU limit), decode, greedy 16."""
    model, folders = exports
    onnx_model = OnnxModel(folders[flavour], provider=provider)
    if provider != "cpu":
        assert onnx_model.placement.status in ("full", "partial")  # not a silent fallback
        assert onnx_model.placement.nodes[providers.full_name(provider)] > 0
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, (2, 44))
    mask = np.ones((2, 44), np.int64)
    mask[1, :9] = 0
    want = np.array(model(mx.array(ids), attention_mask=mx.array(mask)))
    logits, past = onnx_model(ids[:, :40], mask[:, :40])
    pieces = [logits]
    for t in range(40, 44):
        logits, past = onnx_model(ids[:, t : t + 1], mask[:, : t + 1], past)
        pieces.append(logits)
    got, real = np.concatenate(pieces, axis=1), mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-3)
    gen = OnnxGenerator(folders[flavour], provider=provider)
    cpu = OnnxGenerator(folders[flavour])
    prompt = [[1, 2, 3, 4, 5], [9, 8]]
    a = [r.tokens for r in gen.generate_tokens(prompt, max_tokens=16)]
    assert a == [r.tokens for r in cpu.generate_tokens(prompt, max_tokens=16)]


def test_plugins_are_registered_without_editing_sys_path():
    """A fresh process: the private WebGPU install is loaded by path, not via sys.path."""
    code = (
        "import sys; before = list(sys.path); from export import providers; "
        "names = providers.available(); assert sys.path == before, sys.path; "
        f"assert ({WEBGPU!r} in names) == {HAS_WEBGPU}"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.skipif(HAS_WEBGPU, reason="the WebGPU EP is installed here")
def test_webgpu_missing_is_reported():
    with pytest.raises(providers.ProviderError, match="install_webgpu_ep.sh"):
        providers.create_session("unused.onnx", "webgpu")
