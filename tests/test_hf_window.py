"""Sliding windows through Hugging Face: Mistral/Ministral import and export against transformers
(eager attention) on text longer than the window, padded batches included, and decoding past the
window against mlx-lm's RotatingKVCache on the same weights."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from helpers import HF_LLAMA, LLAMA, save_hf_model
from mlx.utils import tree_flatten, tree_unflatten
from test_hf import hf_logits
from test_model import random_model, tiny_config

from mlx_transformer.checkpoint.hf import import_hf, llama_name, save_hf
from mlx_transformer.checkpoint.hf_window import window_from_hf
from mlx_transformer.errors import UserError
from mlx_transformer.model import make_cache

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LLAMA_DIMS = dict(**HF_LLAMA, attn_implementation="eager")
HF_MODELS = {
    "mistral": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**LLAMA_DIMS, sliding_window=6)
    ),
    "ministral": lambda: transformers.MinistralForCausalLM(
        transformers.MinistralConfig(
            **LLAMA_DIMS,
            head_dim=16,  # its head_dim has no default
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention"],
        )
    ),
}
ROPE = LLAMA  # the windowed tests run on rotary models


def padded_batch(seed: int, vocab: int, T: int = 30) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (3, T))
    mask = np.ones_like(ids)
    mask[1, :9] = 0  # left padding
    mask[2, 17:] = 0  # right padding
    return ids, mask


@pytest.fixture(params=list(HF_MODELS), scope="module")
def hf_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model = save_hf_model(HF_MODELS[request.param], folder)
    return folder, model


def test_imported_windowed_model_matches_transformers_past_the_window(hf_folder):
    folder, hf_model = hf_folder
    ours = import_hf(folder)
    assert ours.config.sliding_window == hf_model.config.sliding_window
    ids, mask = padded_batch(0, 97)
    got = np.array(ours(mx.array(ids), attention_mask=mx.array(mask)))
    want = hf_logits(hf_model, ids, mask)
    real = mask.astype(bool)
    assert np.abs(got[real] - want[real]).max() <= 1e-4
    full = np.array(ours(mx.array(ids[:1])))  # unpadded
    assert np.abs(full - hf_logits(hf_model, ids[:1])).max() <= 1e-4


@pytest.mark.parametrize(
    "types", [None, ["full_attention", "sliding_attention"]], ids=["mistral", "ministral"]
)
def test_our_windowed_model_loads_in_transformers(types, tmp_path):
    model = random_model(tiny_config(**ROPE, sliding_window=5, layer_types=types))
    save_hf(model, tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    assert type(hf_model).__name__ == (
        "MistralForCausalLM" if types is None else "MinistralForCausalLM"
    )
    ids, mask = padded_batch(1, 61)
    got = np.array(model(mx.array(ids), attention_mask=mx.array(mask)))
    real = mask.astype(bool)
    assert np.abs(got[real] - hf_logits(hf_model, ids, mask)[real]).max() <= 1e-4
    back = import_hf(tmp_path)  # and back: the same configuration
    assert (back.config.sliding_window, back.config.layer_types) == (5, types)


def test_models_without_a_hugging_face_window_are_refused(tmp_path):
    sinks = random_model(tiny_config(**ROPE, sliding_window=5, attention_sinks=2))
    with pytest.raises(UserError, match="attention_sinks has no Hugging Face equivalent"):
        save_hf(sinks, tmp_path / "a")
    gpt2 = random_model(tiny_config(sliding_window=5))
    with pytest.raises(UserError, match="gpt2 has no sliding window"):
        save_hf(gpt2, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(UserError, match="mlx-lm reads Mistral as Llama"):
        save_hf(
            random_model(tiny_config(**ROPE, sliding_window=5)), tmp_path / "c", runtime="mlx-lm"
        )


def test_window_fields_of_each_family():
    n = 4
    assert window_from_hf({"sliding_window": 8, "layer_types": ["x"]}, "mistral", n) == {
        "sliding_window": 8,
        "layer_types": None,
    }
    assert window_from_hf({"sliding_window": None}, "mistral", n) == {}
    qwen = {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}
    assert (
        window_from_hf(qwen, "qwen2", n)["layer_types"]
        == ["full_attention"] * 2 + ["sliding_attention"] * 2
    )
    assert window_from_hf({**qwen, "use_sliding_window": False}, "qwen2", n) == {}
    assert window_from_hf({"sliding_window": 8}, "llama", n) == {}  # neither runtime reads it
    types = ["sliding_attention", "full_attention"] * 2
    assert window_from_hf({"sliding_window": 8, "layer_types": types}, "llama", n) == {
        "sliding_window": 8,
        "layer_types": types,
    }


@pytest.mark.parametrize("sinks", [0, 2])
def test_rolling_cache_decoding_matches_mlx_lm_rotating_cache(sinks, tmp_path):
    """mlx-lm's Llama with layer_types (its RotatingKVCache on the sliding layers) on our weights:
    prefill, then decode 8x the window, logits equal at every step. Sinks are its `keep`: a
    RotatingKVCache of window + keep slots keeps the first `keep` tokens, and its Llama's window
    (over those slots) is then window + keep; its prefill knows no sinks, so there the prompt
    fits the window."""
    llama = pytest.importorskip("mlx_lm.models.llama")
    from mlx_lm.models.cache import RotatingKVCache

    types = ["full_attention", "sliding_attention"]
    config = tiny_config(**ROPE, sliding_window=4, layer_types=types, attention_sinks=sinks)
    model = random_model(config, seed=3)
    c = model.config
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        intermediate_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.norm_eps,
        vocab_size=c.vocab_size,
        rope_theta=c.rope_theta,
        tie_word_embeddings=False,
        max_position_embeddings=c.max_position_embeddings,
        layer_types=types,
        sliding_window=4 + sinks,  # its masks window the cache's slots, sinks included
    )
    theirs = llama.Model(args)
    theirs.update(tree_unflatten([(llama_name(k), v) for k, v in tree_flatten(model.parameters())]))
    ids = np.random.default_rng(4).integers(0, c.vocab_size, (1, 4 * 8 + 7))
    their_cache, our_cache = theirs.make_cache(), make_cache(model, rolling=True)
    assert type(their_cache[1]).__name__ == "RotatingKVCache"
    their_cache[1] = RotatingKVCache(max_size=4 + sinks, keep=sinks)
    prompt = 4 if sinks else 7
    a = theirs(mx.array(ids[:, :prompt]), cache=their_cache)
    b = model(mx.array(ids[:, :prompt]), cache=our_cache)
    worst = np.abs(np.array(a) - np.array(b)).max()
    for t in range(prompt, ids.shape[1]):
        a = theirs(mx.array(ids[:, t : t + 1]), cache=their_cache)
        b = model(mx.array(ids[:, t : t + 1]), cache=our_cache)
        worst = max(worst, np.abs(np.array(a) - np.array(b)).max())
    assert worst <= 1e-4
    assert our_cache[1].size == 3 + sinks and their_cache[1].keys.shape[2] <= 4 + sinks + 1


@pytest.mark.parametrize(
    "overrides",
    [dict(attention_bias=True, attention_out_bias=False), dict(qk_norm=True)],
    ids=["qwen2", "qwen3"],
)
def test_our_windowed_qwen_models_keep_their_family(overrides, tmp_path):
    types = ["full_attention", "sliding_attention"]
    config = tiny_config(**{**ROPE, **overrides}, sliding_window=5, layer_types=types)
    model = random_model(config)
    save_hf(model, tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    assert hf_model.config.layer_types == types and hf_model.config.sliding_window == 5
    ids, mask = padded_batch(2, 61)
    got = np.array(model(mx.array(ids), attention_mask=mx.array(mask)))
    real = mask.astype(bool)
    assert np.abs(got[real] - hf_logits(hf_model, ids, mask)[real]).max() <= 1e-4
    back = import_hf(tmp_path)
    assert (back.config.sliding_window, back.config.layer_types) == (5, types)
    with pytest.raises(UserError, match="mlx-lm.s Qwen2 and Qwen3 have none"):
        save_hf(model, tmp_path / "mlx", runtime="mlx-lm")
