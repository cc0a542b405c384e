"""Sliding windows in the ONNX export: both flavours against MLX on padded batches, and decoding
past the window with the runtime's bounded cache, on every provider installed here."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from helpers import LLAMA
from test_model import random_model, tiny_config
from test_onnx_providers import HAS_WEBGPU, NO_WEBGPU

from export import export_onnx
from export.runtime import OnnxGenerator
from export.session import OnnxModel
from mlx_transformer.checkpoint.mlx_io import save_checkpoint
from mlx_transformer.errors import UserError
from mlx_transformer.generate.api import generate_step

ROPE = LLAMA  # the windowed tests run on rotary models
CASES = {
    "rope-window": dict(**ROPE, sliding_window=5),
    "rope-sinks": dict(**ROPE, sliding_window=4, attention_sinks=2),
    "rope-mixed": dict(
        **ROPE, sliding_window=3, layer_types=["full_attention", "sliding_attention"]
    ),
    "learned-window": dict(sliding_window=6),
}
_cache: dict = {}


def exported(name: str, flavour: str, tmp_path_factory):
    """(MLX model, export folder), built once per session."""
    if (name, flavour) not in _cache:
        if name not in _cache:
            model = random_model(tiny_config(**CASES[name]))
            _cache[name] = (model, save_checkpoint(tmp_path_factory.mktemp(f"ckpt-{name}"), model))
        model, ckpt = _cache[name]
        out = tmp_path_factory.mktemp(f"onnx-{name}-{flavour}")
        export_onnx(ckpt, out, flavour=flavour)
        _cache[(name, flavour)] = (model, out)
    return _cache[(name, flavour)]


@pytest.mark.parametrize("flavour", ["portable", "ort"])
@pytest.mark.parametrize("name", list(CASES))
def test_windowed_prefill_and_decode_match_mlx(name, flavour, tmp_path_factory):
    """A left-padded batch: prefill 10 tokens, then one token at a time to 40 (8x a window of 5):
    every logit equals MLX's full forward pass with the windowed mask."""
    model, folder = exported(name, flavour, tmp_path_factory)
    # ort: past and present in one buffer where the past is not cut (full-attention layers)
    onnx_model = OnnxModel(folder, share_buffer=flavour == "ort")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, (2, 40))
    mask = np.ones_like(ids)
    mask[1, :7] = 0
    want = np.array(model(mx.array(ids), attention_mask=mx.array(mask)))
    logits, past = onnx_model(ids[:, :10], mask[:, :10])
    pieces, lengths = [logits], []
    for t in range(10, 40):
        logits, past = onnx_model(ids[:, t : t + 1], mask[:, : t + 1], past)
        pieces.append(logits)
        lengths.append(t + 1 if onnx_model.share_buffer else past[0].shape[2])
    got, real = np.concatenate(pieces, axis=1), mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-3)
    bound, sinks = onnx_model.io.get("past_window"), model.config.attention_sinks
    assert onnx_model.share_buffer == (flavour == "ort" and bound is None)
    if name != "rope-mixed":  # bounded: twice the window's past, and the sinks' columns
        head = sinks + 7 if sinks else 0  # row 1's padding puts its sinks 7 columns later
        assert bound == model.config.sliding_window - 1
        assert max(lengths[-12:]) < head + 2 * bound < 40
    else:  # full-attention layers keep the whole past
        assert bound is None and lengths[-1] == 40


@pytest.mark.parametrize("flavour", ["portable", "ort"])
def test_right_padding_matches_mlx(flavour, tmp_path_factory):
    model, folder = exported("rope-sinks", flavour, tmp_path_factory)
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 23))
    mask = np.ones_like(ids)
    mask[0, 15:] = 0
    logits, _ = OnnxModel(folder)(ids, mask)
    want = np.array(model(mx.array(ids), attention_mask=mx.array(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], want[real], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize(
    "provider",
    [
        "cpu",
        pytest.param(
            "webgpu",
            marks=[pytest.mark.skipif(not HAS_WEBGPU, reason=NO_WEBGPU), pytest.mark.slow],
        ),
    ],
)
@pytest.mark.parametrize("flavour", ["portable", "ort"])
def test_greedy_generation_past_the_window_matches_mlx(flavour, provider, tmp_path_factory):
    """The ONNX generator (bounded cache; IO binding on WebGPU) gives MLX's greedy tokens."""
    model, folder = exported("rope-window", flavour, tmp_path_factory)
    gen = OnnxGenerator(folder, provider=provider)
    if provider != "cpu":
        assert gen.model.placement.status in ("full", "partial")
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8]]
    got = [r.tokens for r in gen.generate_tokens(prompts, max_tokens=30, stop_at_eos=False)]
    for prompt, tokens in zip(prompts, got):
        assert tokens == list(generate_step(prompt, model, max_tokens=30))


@pytest.mark.parametrize("flavour", ["portable", "ort"])
def test_onnxruntime_genai_runs_the_window_from_the_graph(flavour, tmp_path_factory):
    """genai_config.json carries no `sliding_window`: genai's is its windowed static cache for
    NPU graphs (uint8 caches; ours is refused with "Expected input data type to be uint8_t for
    WindowedKeyValueCache"). The graph's mask holds the window, so genai is exact as it is."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai (the test extra)")
    model, folder = exported("rope-window", flavour, tmp_path_factory)
    prompt = [3, 5, 7, 9, 11, 13, 2]
    genai_model = og.Model(str(folder))
    params = og.GeneratorParams(genai_model)
    params.set_search_options(max_length=len(prompt) + 30)
    generator = og.Generator(genai_model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    got = [int(t) for t in generator.get_sequence(0)[len(prompt) :]]
    assert got == list(generate_step(prompt, model, max_tokens=30))


@pytest.mark.parametrize("name", ["rope-window", "rope-sinks"])
def test_portable_windowed_rotary_export_generates_past_the_context(name, tmp_path_factory):
    """io.json says unbounded_positions for the portable graph (rotary angles from position_ids)
    with a bounded past: 60 greedy tokens after a 7-token prompt, past the context of 48, equal
    to MLX's. The ort graph's rotary tables end at the context: the usual one-line refusal."""
    model, folder = exported(name, "portable", tmp_path_factory)
    gen = OnnxGenerator(folder)
    assert gen.model.unbounded and gen.model.io["past_window"] == model.config.sliding_window - 1
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8]]
    got = gen.generate_tokens(prompts, max_tokens=60, stop_at_eos=False)
    for prompt, result in zip(prompts, got):
        assert result.tokens == list(generate_step(prompt, model, max_tokens=60))
        assert result.finish_reason == "length"
    prompt = prompts[0]
    _, ort_folder = exported(name, "ort", tmp_path_factory)
    with pytest.raises(UserError, match="exceeds the model's context of 48"):
        OnnxGenerator(ort_folder).generate_tokens([prompt], max_tokens=60)


def test_export_folder_config_states_the_window(tmp_path_factory):
    """The deployment folder's Hugging Face config.json says Mistral with the window (what
    optimum and transformers.js read); with sinks, which no Hugging Face field says, it
    describes the graph's interface only."""
    transformers = pytest.importorskip("transformers")
    _, folder = exported("rope-window", "portable", tmp_path_factory)
    hf = transformers.AutoConfig.from_pretrained(folder)
    assert hf.model_type == "mistral" and hf.sliding_window == 5
    _, folder = exported("rope-sinks", "portable", tmp_path_factory)
    hf = transformers.AutoConfig.from_pretrained(folder)
    assert hf.model_type == "llama" and "interface only" in hf.mlx_transformer_note
