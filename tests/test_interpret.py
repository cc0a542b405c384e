"""Looking inside: attention maps, logit lens, ablations, head classifiers, the inspect command."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from test_model import CONFIGS, random_model, tiny_config

from mlx_transformer.checkpoint.mlx_io import save_checkpoint
from mlx_transformer.cli import main as cli_main
from mlx_transformer.config import ModelConfig
from mlx_transformer.interpret import analysis as interpret
from mlx_transformer.model import Transformer

IDS = mx.array([[7, 3, 19, 3, 7, 44, 2, 19, 3, 60, 11, 5]])


@pytest.fixture(params=["gpt2", "llama-gqa", "paper"])
def model(request):
    return random_model(tiny_config(**CONFIGS[request.param]))


def test_attention_maps_are_causal_distributions(model):
    w = interpret.attention_maps(model, IDS)
    assert w.shape == (2, 1, 4, 12, 12)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    assert np.all(np.triu(w, k=1) == 0)


def test_attention_weights_imply_the_fused_output(model):
    explicit = model.forward(IDS, output_attentions=True).logits
    np.testing.assert_allclose(np.array(explicit), np.array(model(IDS)), atol=1e-5)


def test_padded_positions_get_no_attention(model):
    mask = mx.array([[0, 0, 0] + [1] * 9])
    out = model.forward(IDS, mask, output_attentions=True)
    for w in out.attentions:
        assert np.all(np.array(w)[0, :, 3:, :3] == 0)


def test_logit_lens_last_layer_is_the_models_own_output(model):
    lens = interpret.logit_lens(model, IDS)
    assert lens.shape[0] == model.config.num_hidden_layers + 1
    own = np.array(nn.log_softmax(model(IDS), axis=-1))
    np.testing.assert_allclose(lens[-1], own, atol=1e-5)
    summary = interpret.lens_summary(lens[:, 0], np.array(IDS[0]), k=3)
    assert summary["top_ids"].shape == (3, 12, 3)
    assert np.all(np.diff(summary["top_probs"], axis=-1) <= 0)  # sorted, most likely first
    np.testing.assert_allclose(summary["correct_prob"][-1, 0], np.exp(own[0, 0, 3]), rtol=1e-5)


def test_ablating_a_silent_head_changes_nothing_and_models_are_restored(model):
    before = np.array(model(IDS))
    # Head 1 of layer 0 writes nothing: zero its columns of the output projection.
    hd = model.config.head_dim
    w = model.layers[0].attn.o_proj.weight
    w[:, hd : 2 * hd] = 0.0
    model.layers[0].attn.o_proj.weight = w
    silent = np.array(model(IDS))
    with interpret.ablated(model, ("head", 0, 1)):
        np.testing.assert_array_equal(np.array(model(IDS)), silent)
    scores = interpret.ablation_scores(model, IDS)
    assert scores["heads"][0, 1] == 0.0
    assert np.abs(scores["heads"]).sum() > 0 and np.all(scores["mlp"] != 0)
    model.layers[0].attn.o_proj.weight = w  # unchanged module tree after all the swaps
    assert [k for k, _ in tree_flatten(model.parameters())] == list(model.config.parameter_shapes())
    assert not np.array_equal(before, silent)


@pytest.mark.parametrize("component", [("head", 1, 2), ("mlp", 1)])
@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablation_changes_only_what_is_downstream(model, component, mode):
    means = interpret.component_means(model, IDS) if mode == "mean" else None
    start = 5
    clean = model.forward(IDS, output_hidden_states=True).hidden_states
    with interpret.ablated(model, component, means, start=start):
        hit = model.forward(IDS, output_hidden_states=True).hidden_states
    layer = component[1]
    for stage, (a, b) in enumerate(zip(clean, hit)):
        a, b = np.array(a)[0], np.array(b)[0]
        np.testing.assert_array_equal(a[:start], b[:start])  # earlier positions: untouched
        if stage <= layer:  # the embedding and the blocks before the ablated one
            np.testing.assert_array_equal(a, b)
        else:
            assert np.abs(a[start:] - b[start:]).max() > 1e-4


def previous_token_model() -> Transformer:
    """Layer 0 head 0 is wired by hand to attend to the previous token; everything else is 0."""
    T = 16
    config = ModelConfig(
        vocab_size=20,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=T,
        norm_type="rmsnorm",
        attention_bias=False,
        mlp_bias=False,
    )
    model = Transformer(config)
    params = {k: mx.zeros(v.shape) for k, v in tree_flatten(model.parameters())}
    for k in params:
        if k.endswith("norm.weight"):
            params[k] = mx.ones(params[k].shape)
    params["embed_positions.weight"] = mx.eye(T, 32)  # position p -> one-hot e_p
    hd = config.head_dim  # 16 = T
    q = np.zeros((32, 32))
    k = np.zeros((32, 32))
    for p in range(T):
        q[p, p] = 1.0  # query of position p: e_p
        if p + 1 < T:
            k[p + 1, p] = 1.0  # key of position p: e_{p+1}, so it matches the query of p + 1
    params["layers.0.attn.q_proj.weight"] = mx.array(q * 4.0)
    params["layers.0.attn.k_proj.weight"] = mx.array(k * 4.0)
    assert hd == T
    model.update(tree_unflatten(list(params.items())))
    model.eval()
    return model


def test_a_hand_built_previous_token_head_is_classified_as_one():
    model = previous_token_model()
    ids = mx.array([[3, 9, 1, 4, 15, 9, 2, 6, 5, 3, 5, 8]])
    scores = interpret.head_scores(model, ids, n_random=7)
    assert scores["previous_token"][0, 0] > 0.95
    assert scores["previous_token"][0, 1] < 0.5  # the all-zero head attends uniformly
    assert interpret.top_heads(scores["previous_token"], k=1)[0][:2] == (0, 0)
    assert scores["first_token"][0, 0] < 0.1


@pytest.mark.slow
def test_inspect_command_writes_pictures_and_numbers(tmp_path, tiny_tokenizer_path, capsys):
    from mlx_transformer.tokenizer import Tokenizer

    vocab = Tokenizer.load(tiny_tokenizer_path).vocab_size
    model = random_model(tiny_config(vocab_size=vocab, max_position_embeddings=64))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer_path=tiny_tokenizer_path)
    out = tmp_path / "inspect"
    args = [
        "inspect",
        "--model",
        str(ckpt),
        "--prompt",
        "First Citizen: speak, speak.",
        "--out",
        str(out),
    ]
    assert cli_main(args) == 0
    for name in (
        "attention.png",
        "attention.npz",
        "logit_lens.png",
        "logit_lens.json",
        "ablation.png",
        "ablation.json",
        "heads.json",
    ):
        assert (out / name).stat().st_size > 0, name
    assert (out / "attention.png").read_bytes()[:4] == b"\x89PNG"
    saved = np.load(out / "attention.npz")
    assert saved["weights"].shape[:2] == (2, 4)
    # The prompt is read as a document start: after EOS, as in training data (never BOS).
    tokenizer = Tokenizer.load(tiny_tokenizer_path)
    want = [tokenizer.eos_id] + tokenizer.encode("First Citizen: speak, speak.")
    assert saved["ids"].tolist() == want
    ablation = json.loads((out / "ablation.json").read_text())
    assert len(ablation["heads"]) == 2 and len(ablation["ranked"]) == 2 * 4 + 2
    printed = capsys.readouterr().out
    assert "logit lens at the last position" in printed and "induction heads" in printed
    assert cli_main(args + ["--ablate", "1.3", "--ablation-mode", "mean"]) == 0
    assert cli_main(args + ["--ablate", "7.0"]) == 2  # one-line error: no such layer
