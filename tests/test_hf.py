"""Parity with a reference nobody here wrote: tiny random Hugging Face GPT-2 and Llama models."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_model import CONFIGS, random_model, tiny_config

from mlx_transformer.checkpoint.hf import import_hf, save_hf
from mlx_transformer.checkpoint.mlx_io import load_checkpoint
from mlx_transformer.cli import main as cli_main
from mlx_transformer.errors import UserError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF_MODELS = {
    # learned positions, pre-LN LayerNorm, GELU-tanh, tied embeddings
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=97,
            n_embd=48,
            n_layer=2,
            n_head=4,
            n_positions=64,
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
        )
    ),
    # rotary, RMSNorm, SwiGLU, grouped-query attention, untied head
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=97,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        )
    ),
}


def hf_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {}
        if mask is not None:  # positions count real tokens, as transformers' generate() does
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
            kwargs = {"attention_mask": torch.tensor(mask), "position_ids": torch.tensor(positions)}
        return model(torch.tensor(ids), **kwargs).logits.double().numpy()


@pytest.fixture(params=list(HF_MODELS), scope="module")
def hf_folder(request, tmp_path_factory):
    torch.manual_seed(0)
    model = HF_MODELS[request.param]().eval()
    with torch.no_grad():  # O(1) weights so differences are not hidden by tiny activations
        for p in model.parameters():
            p.normal_(0, 0.5 / np.sqrt(p.shape[-1]) if p.ndim == 2 else 0.1).add_(
                1.0 if p.ndim == 1 else 0.0
            )
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def test_imported_hf_model_matches_transformers(hf_folder):
    folder, hf_model = hf_folder
    ids = np.random.default_rng(0).integers(0, 97, (2, 33))
    ours = import_hf(folder)
    got = np.array(ours(mx.array(ids)))
    want = hf_logits(hf_model, ids)
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()


def test_imported_hf_model_matches_transformers_with_left_padding(hf_folder):
    folder, hf_model = hf_folder
    ids = np.random.default_rng(1).integers(0, 97, (2, 20))
    mask = np.ones_like(ids)
    mask[0, :6] = 0
    ours = import_hf(folder)
    got = np.array(ours(mx.array(ids), attention_mask=mx.array(mask)))
    want = hf_logits(hf_model, ids, mask)
    real = mask.astype(bool)
    assert np.abs(got[real] - want[real]).max() <= 1e-4


def test_cli_import_then_export_round_trips_to_transformers(hf_folder, tmp_path):
    folder, hf_model = hf_folder
    ckpt, back = tmp_path / "ckpt", tmp_path / "hf"
    assert cli_main(["convert", "--from-hf", str(folder), "--out", str(ckpt)]) == 0
    assert cli_main(["convert", "--to-hf", str(ckpt), "--out", str(back)]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    ids = np.random.default_rng(2).integers(0, 97, (1, 40))
    np.testing.assert_allclose(hf_logits(reloaded, ids), hf_logits(hf_model, ids), atol=1e-6)
    ours = np.array(load_checkpoint(ckpt)(mx.array(ids)))
    assert np.abs(ours - hf_logits(hf_model, ids)).max() <= 1e-4


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_our_models_load_in_transformers(name, tmp_path):
    overrides = CONFIGS[name] if name != "gpt2" else {"hidden_act": "gelu_tanh"}
    model = random_model(tiny_config(**overrides))
    save_hf(model, tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = np.random.default_rng(3).integers(0, 61, (2, 30))
    got = np.array(model(mx.array(ids)))
    assert np.abs(got - hf_logits(hf_model, ids)).max() <= 1e-4


def test_configuration_of_neither_family_is_refused(tmp_path):
    model = random_model(tiny_config(**CONFIGS["paper"]))
    with pytest.raises(UserError, match="matches neither GPT-2"):
        save_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(UserError, match="missing field|pickle"):
        import_hf(tmp_path)


def test_our_llama_loads_in_mlx_lm(tmp_path):
    """mlx-lm (the peer users already run) loads our Llama-layout export with the same logits."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    model = random_model(tiny_config(**CONFIGS["llama-gqa"]))
    save_hf(model, tmp_path)
    theirs, _ = mlx_lm_utils.load_model(tmp_path)
    ids = mx.array(np.random.default_rng(4).integers(0, 61, (2, 25)))
    assert np.abs(np.array(theirs(ids)) - np.array(model(ids))).max() <= 1e-5
