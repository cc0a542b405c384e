"""The family fields on their own: rotary frequencies against transformers' ROPE_INIT_FUNCTIONS
and the float64 reference, what import refuses (one line naming config.json and the field),
validation that names the field, old config.json files, and models made here written as Qwen2,
Qwen3 or Llama 3 (tests/test_families.py imports tiny transformers models of each)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import save_hf_model
from test_families import ATOL, LLAMA3, SHAPE, padded_batch
from test_hf import hf_logits
from test_model import random_model, tiny_config

import reference
from export.deploy import hf_config
from mlx_transformer.checkpoint.hf import save_hf
from mlx_transformer.checkpoint.hf_config import family_of
from mlx_transformer.checkpoint.mlx_io import save_checkpoint
from mlx_transformer.cli import main as cli_main
from mlx_transformer.config import ConfigError, ModelConfig
from mlx_transformer.errors import UserError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# The same as our config's rope_scaling (theta is a field of its own), for head size 8.
OUR_LLAMA3 = {k: v for k, v in LLAMA3.items() if k != "rope_theta"} | {
    "original_max_position_embeddings": 16
}


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
    save_hf_model(
        lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SHAPE)),
        folder,
        o1_weights=False,
    )
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
        "rope_parameters.low_freq_factor missing",
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
