"""Qwen2, Qwen3 and Llama 3.x rope scaling against references nobody here wrote: tiny random
transformers models imported through `convert --from-hf`, written back with `--to-hf` for
transformers and mlx-lm, and exported to ONNX (both flavours, on every provider installed)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import save_hf_model
from mlx.utils import tree_flatten
from test_hf import hf_logits

import reference
from export import export_onnx, providers
from export.session import OnnxModel
from mlx_transformer.checkpoint.hf import import_hf, save_hf
from mlx_transformer.checkpoint.mlx_io import load_checkpoint, save_checkpoint
from mlx_transformer.cli import main as cli_main
from mlx_transformer.generate.api import generate_step
from mlx_transformer.model import make_cache

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Odd shapes: 6 heads of 8 over 2 key/value heads; Qwen3's head size (16) is not 40 / 4.
SHAPE = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
# head size 8, theta 1e4: wavelengths 6.3, 63, 628, 6283 — kept (< 64/4), blended, divided (> 64).
LLAMA3 = dict(
    rope_type="llama3",
    factor=4.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
    rope_theta=10000.0,
)
LINEAR = dict(rope_type="linear", factor=2.0, rope_theta=10000.0)

HF_MODELS = {  # name: (model_type written back, transformers model)
    "qwen2": (
        "qwen2",
        lambda: transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(**SHAPE, tie_word_embeddings=True)
        ),
    ),
    "qwen3": (
        "qwen3",
        lambda: transformers.Qwen3ForCausalLM(
            transformers.Qwen3Config(
                **{**SHAPE, "hidden_size": 40, "num_attention_heads": 4}, head_dim=16
            )
        ),
    ),
    "llama3-rope": (
        "llama",
        lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                **{**SHAPE, "max_position_embeddings": 128}, rope_parameters=LLAMA3
            )
        ),
    ),
    "linear-rope": (
        "llama",
        lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**SHAPE, rope_parameters=LINEAR)
        ),
    ),
}
ATOL = 1e-4


@pytest.fixture(params=list(HF_MODELS), scope="module")
def family(request, tmp_path_factory):
    """(name, model_type, Hugging Face folder, transformers model, our import of it)."""
    model_type, make = HF_MODELS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    hf_model = save_hf_model(make, folder)
    return request.param, model_type, folder, hf_model, import_hf(folder)


def padded_batch(seed: int, padding: str, length: int = 40) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(seed).integers(0, 97, (2, length))
    mask = np.ones_like(ids)
    if padding == "left":
        mask[0, :9] = 0
    elif padding == "right":
        mask[1, -7:] = 0
    return ids, mask


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_imported_family_matches_transformers(family, padding):
    _, _, _, hf_model, ours = family
    ids, mask = padded_batch(0, padding)
    got = np.array(ours(mx.array(ids), attention_mask=mx.array(mask)))
    real = mask.astype(bool)
    err = np.abs(got - hf_logits(hf_model, ids, mask))[real].max()
    assert err <= ATOL, err


def test_imported_family_matches_float64_reference(family):
    _, _, _, _, ours = family
    ids, mask = padded_batch(1, "left")
    got = np.array(ours(mx.array(ids), attention_mask=mx.array(mask)))
    params = {k: np.array(v) for k, v in tree_flatten(ours.parameters())}
    want, _ = reference.forward(ours.config, params, ids, mask)
    real = mask.astype(bool)
    assert np.abs(got - want)[real].max() <= 1e-5


def test_imported_family_kv_cache_decode_matches_full_forward(family):
    _, _, _, _, ours = family
    ids, mask = padded_batch(2, "left")
    full = np.array(ours(mx.array(ids), attention_mask=mx.array(mask)))
    cache = make_cache(ours)
    pieces = [ours(mx.array(ids[:, :30]), attention_mask=mx.array(mask[:, :30]), cache=cache)]
    for t in range(30, ids.shape[1]):
        step = mx.array(ids[:, t : t + 1])
        pieces.append(ours(step, attention_mask=mx.array(mask[:, : t + 1]), cache=cache))
    got = np.concatenate([np.array(p) for p in pieces], axis=1)
    real = mask.astype(bool)
    assert np.abs(got - full)[real].max() <= 1e-5


def test_family_round_trips_to_transformers_and_mlx_lm(family, tmp_path):
    """convert --from-hf, then --to-hf --for mlx-lm: transformers reads back the very model,
    and mlx-lm's own loader gives our logits."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    _, model_type, folder, hf_model, _ = family
    ckpt, back = tmp_path / "ckpt", tmp_path / "hf"
    assert cli_main(["convert", "--from-hf", str(folder), "--out", str(ckpt)]) == 0
    args = ["convert", "--to-hf", str(ckpt), "--out", str(back), "--for", "mlx-lm"]
    assert cli_main(args) == 0
    assert json.loads((back / "config.json").read_text())["model_type"] == model_type
    ids, mask = padded_batch(3, "left")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    want = hf_logits(hf_model, ids, mask)
    np.testing.assert_allclose(hf_logits(reloaded, ids, mask), want, atol=1e-6)
    ours = load_checkpoint(ckpt)
    theirs, _ = mlx_lm_utils.load_model(back)
    ids = mx.array(ids)
    assert np.abs(np.array(theirs(ids)) - np.array(ours(ids))).max() <= 1e-5


WEBGPU = "WebGpuExecutionProvider"
PROVIDERS = [
    "cpu",
    pytest.param(
        "webgpu",
        marks=pytest.mark.skipif(
            WEBGPU not in providers.available(), reason="WebGPU EP not installed"
        ),
    ),
]


@pytest.fixture(scope="module")
def onnx_exports(tmp_path_factory):
    """{(family name, flavour): export folder}, written once per module."""
    return {}


def exported(family, flavour: str, onnx_exports: dict, tmp_path_factory) -> Path:
    name, _, _, _, ours = family
    if (name, flavour) not in onnx_exports:
        ckpt = save_checkpoint(tmp_path_factory.mktemp(f"ckpt-{name}"), ours)
        out = tmp_path_factory.mktemp(f"onnx-{name}-{flavour}")
        export_onnx(ckpt, out, flavour=flavour)
        onnx_exports[name, flavour] = out
    return onnx_exports[name, flavour]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("flavour", ["portable", "ort"])
def test_family_onnx_export_matches_mlx(family, flavour, provider, onnx_exports, tmp_path_factory):
    """Padded prefill of 36 tokens, then 4 decode steps, on the provider; and the export
    folder's config.json names the family itself (it describes the model exactly)."""
    name, model_type, _, _, ours = family
    out = exported(family, flavour, onnx_exports, tmp_path_factory)
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["model_type"] == model_type and "mlx_transformer_note" not in hf_config
    assert transformers.AutoConfig.from_pretrained(out).head_dim == ours.config.head_dim
    onnx_model = OnnxModel(out, provider=provider)
    if provider != "cpu":
        assert onnx_model.placement.nodes[providers.full_name(provider)] > 0
    ids, mask = padded_batch(4, "left")
    want = np.array(ours(mx.array(ids), attention_mask=mx.array(mask)))
    logits, past = onnx_model(ids[:, :36], mask[:, :36])
    pieces = [logits]
    for t in range(36, ids.shape[1]):
        logits, past = onnx_model(ids[:, t : t + 1], mask[:, : t + 1], past)
        pieces.append(logits)
    got, real = np.concatenate(pieces, axis=1), mask.astype(bool)
    err = np.abs(got - want)[real].max()
    assert err <= ATOL, err


def test_qwen2_with_sliding_window_layers_round_trips_with_transformers(tmp_path):
    """Qwen2's use_sliding_window: layers from max_window_layers on see the last 8 tokens;
    --to-hf writes the windows back in Qwen2's fields."""
    config = transformers.Qwen2Config(
        **SHAPE, use_sliding_window=True, sliding_window=8, max_window_layers=1
    )
    config._attn_implementation = "eager"  # transformers' sdpa path ignores the window
    hf_model = save_hf_model(
        lambda: transformers.Qwen2ForCausalLM(config), tmp_path, o1_weights=False
    )
    ours = import_hf(tmp_path)
    assert [ours.config.layer_window(i) for i in range(2)] == [None, 8]
    ids, mask = padded_batch(6, "left", length=30)
    got = np.array(ours(mx.array(ids), attention_mask=mx.array(mask)))
    real = mask.astype(bool)
    want = hf_logits(hf_model, ids, mask)
    assert np.abs(got - want)[real].max() <= ATOL
    save_hf(ours, tmp_path / "back")  # and back, as Qwen2 with the same windows
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "back", attn_implementation="eager"
    ).eval()
    assert back.config.layer_types == ["full_attention", "sliding_attention"]
    np.testing.assert_allclose(hf_logits(back, ids, mask)[real], want[real], atol=1e-6)


@pytest.mark.parametrize("flavour", ["portable", "ort"])
def test_family_export_runs_in_onnxruntime_genai(family, flavour, onnx_exports, tmp_path_factory):
    """onnxruntime-genai on the export folder: the prompt's logits and 24 greedy tokens."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai (the test extra)")
    _, _, _, _, ours = family
    out = exported(family, flavour, onnx_exports, tmp_path_factory)
    prompt = [5, 17, 33, 2, 90, 41]
    want = [int(t) for t in generate_step(prompt, ours, max_tokens=24)]
    genai_model = og.Model(str(out))
    params = og.GeneratorParams(genai_model)
    params.set_search_options(max_length=len(prompt) + 24)  # greedy: the config's default
    generator = og.Generator(genai_model, params)
    generator.append_tokens(prompt)
    prefill = np.asarray(generator.get_output("logits"))[0, -1]
    assert np.abs(prefill - np.array(ours(mx.array([prompt])))[0, -1]).max() <= ATOL
    while not generator.is_done():
        generator.generate_next_token()
    assert [int(t) for t in generator.get_sequence(0)[len(prompt) :]] == want
