"""Qwen2, Qwen3 and Llama 3.x rope scaling against references nobody here wrote: tiny random
transformers models imported through `convert --from-hf`, written back with `--to-hf` for
transformers and mlx-lm, and exported to ONNX (both flavours, on every provider installed)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_hf import hf_logits
from test_model import random_model, tiny_config

import reference
from export import export_onnx, providers
from export.session import OnnxModel
from mlx_transformer.checkpoint.hf import import_hf, save_hf
from mlx_transformer.checkpoint.hf_config import family_of
from mlx_transformer.checkpoint.mlx_io import load_checkpoint, save_checkpoint
from mlx_transformer.cli import main as cli_main
from mlx_transformer.config import ConfigError, ModelConfig
from mlx_transformer.errors import UserError
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
# The same as our config's rope_scaling (theta is a field of its own), for head size 8.
OUR_LLAMA3 = {k: v for k, v in LLAMA3.items() if k != "rope_theta"} | {
    "original_max_position_embeddings": 16
}

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
    torch.manual_seed(0)
    hf_model = make().eval()
    with torch.no_grad():  # O(1) weights (norms near 1) so no difference hides in tiny values
        for p in hf_model.parameters():
            p.normal_(0, 0.5 / np.sqrt(p.shape[-1]) if p.ndim == 2 else 0.1).add_(
                1.0 if p.ndim == 1 else 0.0
            )
    folder = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(folder, safe_serialization=True)
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
    torch.manual_seed(0)
    hf_model = transformers.Qwen2ForCausalLM(config).eval()
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
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


# -- rotary frequencies ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scaling",
    [None, {"rope_type": "linear", "factor": 8.0}, {**LLAMA3, "factor": 8.0}],
    ids=["default", "linear", "llama3"],
)
def test_rope_frequencies_match_transformers_and_reference(scaling):
    """ModelConfig.rope_frequencies (used by model.py and the ONNX builder) against
    transformers' ROPE_INIT_FUNCTIONS and against the reference's pair-by-pair formula."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ours = {"rope_scaling": None}
    hf = {"rope_type": "default", "rope_theta": 500000.0}
    if scaling is not None:
        ours["rope_scaling"] = {k: v for k, v in scaling.items() if k != "rope_theta"}
        hf = {**scaling, "rope_theta": 500000.0}
    config = ModelConfig(
        hidden_size=256,
        num_attention_heads=4,
        max_position_embeddings=512,
        position_encoding="rope",
        rope_theta=500000.0,
        **ours,
    )
    got = np.array(config.rope_frequencies())
    hf_config = transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=4, max_position_embeddings=512, rope_parameters=hf
    )
    if scaling is None:
        want = 500000.0 ** (-np.arange(0, 64, 2) / 64)
    else:
        want = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_config, None)[0].double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)  # transformers computes in float32
    np.testing.assert_allclose(got, reference.rope_frequencies(config), rtol=1e-12)
    if scaling is not None and scaling["rope_type"] == "llama3":  # all three regimes occur
        ratio = 500000.0 ** (-np.arange(0, 64, 2) / 64) / got
        assert np.isclose(ratio, 1).any() and np.isclose(ratio, 8).any()
        assert ((ratio > 1.01) & (ratio < 7.9)).any()


# -- what is refused -------------------------------------------------------------------------------


def _hf_folder(tmp_path, **changes):
    """A tiny random Qwen2 folder whose config.json has `changes` (None deletes a key)."""
    folder = tmp_path / "hf"
    config = transformers.Qwen2Config(**SHAPE)
    transformers.Qwen2ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    d = json.loads((folder / "config.json").read_text())
    d.update(changes)
    (folder / "config.json").write_text(json.dumps(d))
    return folder


REFUSED = {
    "dynamic rope": (
        dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
        "rope_parameters.rope_type 'dynamic'",
    ),
    "yarn (legacy field)": (
        dict(rope_parameters=None, rope_scaling={"type": "yarn", "factor": 2.0}),
        "rope_scaling.rope_type 'yarn'",
    ),
    "llama3 without its fields": (
        dict(rope_parameters={"rope_type": "llama3", "factor": 2.0, "rope_theta": 1e4}),
        "rope_scaling.low_freq_factor",
    ),
    "partial rotary": (dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5"),
    "unknown family": (dict(model_type="phi3"), "model_type 'phi3' is not supported"),
}


@pytest.mark.parametrize("changes, field", REFUSED.values(), ids=list(REFUSED))
def test_unsupported_family_or_rope_is_one_line_and_writes_nothing(
    changes, field, tmp_path, capsys
):
    folder = _hf_folder(tmp_path, **changes)
    out = tmp_path / "ckpt"
    capsys.readouterr()  # save_pretrained's progress bar
    assert cli_main(["convert", "--from-hf", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{folder / 'config.json'}: " in err and field in err, err
    assert not out.exists()


def test_old_config_json_loads_unchanged():
    """A config.json written before the family fields: all four attention biases follow
    attention_bias, no q/k norm, plain rotary; the same tensors as before."""
    old = tiny_config(position_encoding="rope").to_dict()
    for key in ("attention_out_bias", "qk_norm", "rope_scaling"):
        del old[key]
    for bias in (True, False):
        config = ModelConfig.from_dict({**old, "attention_bias": bias})
        assert config.attention_out_bias is bias and not config.qk_norm
        assert config.rope_scaling is None
        assert ("layers.0.attn.o_proj.bias" in config.parameter_shapes()) is bias


BAD_FIELDS = {
    "attention_out_bias": (dict(attention_out_bias="no"), "attention_out_bias must be true"),
    "qk_norm": (dict(qk_norm=1), "qk_norm must be true or false"),
    "rope type": (dict(rope_scaling={"rope_type": "dynamic"}), "rope_scaling.rope_type"),
    "rope factor": (
        dict(rope_scaling={"rope_type": "linear", "factor": float("nan")}),
        "rope_scaling.factor must be a positive finite number",
    ),
    "rope extra field": (
        dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "beta": 1}),
        "rope_scaling.beta is not a field of linear",
    ),
    "llama3 order": (
        dict(rope_scaling={**OUR_LLAMA3, "low_freq_factor": 4.0}),
        "high_freq_factor must exceed low_freq_factor",
    ),
    "theta inside": (dict(rope_scaling=LLAMA3), "rope_scaling.rope_theta is not a field"),
    "rope without rotary": (
        dict(position_encoding="learned", rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "rope_scaling applies to position_encoding rope only",
    ),
}


@pytest.mark.parametrize("changes, message", BAD_FIELDS.values(), ids=list(BAD_FIELDS))
def test_bad_family_fields_name_the_field(changes, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**{"position_encoding": "rope", **changes})


# -- our own models in the families ----------------------------------------------------------------

LLAMA_LIKE = dict(
    position_encoding="rope",
    norm_type="rmsnorm",
    hidden_act="swiglu",
    num_key_value_heads=2,
    mlp_bias=False,
    tie_word_embeddings=False,
)


@pytest.mark.parametrize(
    "overrides, family",
    [
        (dict(attention_bias=True, attention_out_bias=False), "qwen2"),
        (dict(attention_bias=False, qk_norm=True, head_dim=6), "qwen3"),
        (dict(attention_bias=False, rope_scaling=OUR_LLAMA3), "llama"),
    ],
    ids=["qwen2", "qwen3", "llama3-rope"],
)
def test_our_family_models_load_in_transformers(overrides, family, tmp_path):
    """Models made here (not imported): --to-hf names the family, and transformers computes
    our logits from it on a right-padded batch."""
    config = tiny_config(**LLAMA_LIKE, **overrides)
    assert family_of(config) == family
    model = random_model(config)
    save_hf(model, tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = padded_batch(5, "right")
    ids = ids % config.vocab_size
    got = np.array(model(mx.array(ids), attention_mask=mx.array(mask)))
    real = mask.astype(bool)
    assert np.abs(got - hf_logits(hf_model, ids, mask))[real].max() <= ATOL


@pytest.mark.parametrize(
    "overrides",
    [
        dict(hidden_act="gelu_tanh", qk_norm=True),
        dict(hidden_act="gelu_tanh", attention_out_bias=False),
        {**LLAMA_LIKE, "mlp_bias": True, "attention_out_bias": False},
        dict(**{**LLAMA_LIKE, "mlp_bias": True}, qk_norm=True),
    ],
    ids=["gpt2+qk-norm", "gpt2-no-o-bias", "qwen2+mlp-bias", "qwen3+mlp-bias"],
)
def test_mixes_no_family_describes_stay_ours(overrides, tmp_path):
    """A switch a family lacks is never dropped on the way out: --to-hf refuses, and the export
    folder's config.json describes the graph's interface only, and says so."""
    from export.deploy import hf_config

    config = tiny_config(**overrides)
    assert family_of(config) is None
    with pytest.raises(UserError, match="matches neither GPT-2"):
        save_hf(random_model(config), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert "mlx_transformer_note" in hf_config(config, None)


MLX_LM_CANNOT = {
    "qwen2 head size": dict(attention_bias=True, attention_out_bias=False, head_dim=16),
    "qwen3 biases": dict(attention_bias=True, qk_norm=True),
}


@pytest.mark.parametrize("overrides", MLX_LM_CANNOT.values(), ids=list(MLX_LM_CANNOT))
def test_qwen_mlx_lm_cannot_load_is_refused_for_mlx_lm_and_is_real(overrides, tmp_path, capsys):
    """mlx-lm's Qwen2 takes the head size from hidden_size / heads and its Qwen3 has no
    biases: without --for the folder is written (transformers gives our logits), with --for
    mlx-lm it is refused in one line, and mlx-lm indeed fails to load it."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    model = random_model(tiny_config(**LLAMA_LIKE, **overrides))
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    save_checkpoint(ckpt, model)
    args = ["convert", "--to-hf", str(ckpt), "--out", str(out)]
    assert cli_main(args) == 0
    assert "does not load this model correctly" in (out / "README.md").read_text()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.random.default_rng(7).integers(0, 61, (1, 20))
    assert np.abs(hf_logits(hf_model, ids) - np.array(model(mx.array(ids)))).max() <= ATOL
    with pytest.raises(ValueError):
        mlx_lm_utils.load_model(out)
    capsys.readouterr()
    assert cli_main([*args, "--overwrite", "--for", "mlx-lm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mlx-lm cannot load this model correctly" in err, err
