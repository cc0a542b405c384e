"""Activation cache, patching, causal tracing, direct logit attribution and `inspect --trace`;
checked against TransformerLens on the same converted weights."""

from __future__ import annotations

import hashlib
import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import HF_GPT2, HF_LLAMA, save_hf_model
from mlx.utils import tree_flatten
from test_model import CONFIGS, random_model, tiny_config

from mlx_transformer.checkpoint.mlx_io import save_checkpoint
from mlx_transformer.cli import main as cli_main
from mlx_transformer.interpret import analysis, tracing
from mlx_transformer.interpret.hooks import hook_names, patch, run_with_cache, run_with_hooks
from mlx_transformer.model import Block

IDS = mx.array([7, 3, 19, 3, 7, 44, 2, 19, 3, 60, 11, 5])
OTHER = mx.array([7, 3, 21, 8, 7, 44, 2, 19, 3, 60, 11, 5])  # positions 2-3 differ
ANSWER = 9


@pytest.fixture(params=["gpt2", "llama-gqa", "paper"])
def model(request):
    return random_model(tiny_config(**CONFIGS[request.param]))


def module_tree(model):
    return [(k, v.shape) for k, v in tree_flatten(model.parameters())]


def test_cache_is_the_models_own_forward_pass(model):
    tree = module_tree(model)
    out = model.forward(IDS[None], output_hidden_states=True, output_attentions=True)
    logits, cache = run_with_cache(model, IDS[None])
    np.testing.assert_array_equal(np.array(logits), np.array(out.logits))
    assert set(cache) == set(hook_names(model))
    n = len(model.layers)
    np.testing.assert_array_equal(np.array(cache["blocks.0.hook_resid_pre"]), out.hidden_states[0])
    for i in range(n):
        post = np.array(cache[f"blocks.{i}.hook_resid_post"])
        np.testing.assert_array_equal(post, np.array(out.hidden_states[i + 1]))
        np.testing.assert_array_equal(np.array(cache[f"blocks.{i}.attn.hook_pattern"]),
                                      np.array(out.attentions[i]))  # fmt: skip
        if i + 1 < n:
            np.testing.assert_array_equal(post, np.array(cache[f"blocks.{i + 1}.hook_resid_pre"]))
        H, hd = model.config.num_attention_heads, model.config.head_dim
        assert cache[f"blocks.{i}.attn.hook_z"].shape == (1, 12, H, hd)
        assert cache[f"blocks.{i}.attn.hook_k"].shape[2] == model.config.num_key_value_heads
        if model.config.norm_position == "pre":  # resid_mid + mlp_out = resid_post
            mid = cache[f"blocks.{i}.hook_resid_mid"] + cache[f"blocks.{i}.hook_mlp_out"]
            np.testing.assert_allclose(np.array(mid), post, atol=1e-6)
    # The module tree is the model's again, and plain calls take no hooks.
    assert module_tree(model) == tree
    assert all(type(layer) is Block for layer in model.layers)
    again = model.forward(IDS[None], output_attentions=True).logits
    np.testing.assert_array_equal(np.array(again), np.array(out.logits))


def test_module_tree_is_restored_when_a_hook_fails(model):
    tree = module_tree(model)

    def boom(x):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        run_with_hooks(model, IDS[None], {"blocks.1.hook_mlp_out": boom})
    assert module_tree(model) == tree and all(type(b) is Block for b in model.layers)
    with pytest.raises(ValueError, match="unknown hook name"):
        run_with_hooks(model, IDS[None], {"blocks.9.hook_mlp_out": lambda x: x})
    _, cache = run_with_cache(model, IDS[None], names=["blocks.0.attn.hook_z"])
    z = cache["blocks.0.attn.hook_z"]
    with pytest.raises(ValueError, match="outside"):
        run_with_hooks(model, IDS[None], {"blocks.0.attn.hook_z": patch(z, [12])})
    with pytest.raises(ValueError, match="outside"):
        run_with_hooks(model, IDS[None], {"blocks.0.attn.hook_z": patch(z, None, [4])})
    assert module_tree(model) == tree
    with pytest.raises(ValueError, match="read only"):
        run_with_hooks(model, IDS[None], {"blocks.0.attn.hook_pattern": lambda x: x * 0})


def test_patching_a_run_into_itself_changes_nothing_bit_for_bit(model):
    logits, cache = run_with_cache(model, IDS[None])
    names = [n for n in cache if not n.endswith("hook_pattern")]
    patched = run_with_hooks(model, IDS[None], {n: patch(cache[n]) for n in names})
    np.testing.assert_array_equal(np.array(patched), np.array(logits))
    some = run_with_hooks(model, IDS[None], {names[3]: patch(cache[names[3]], [1, 4], None)})
    np.testing.assert_array_equal(np.array(some), np.array(logits))


def test_restoring_everything_or_nothing(model):
    clean, cache = run_with_cache(model, IDS[None])
    corrupt = run_with_hooks(model, OTHER[None])
    last = f"blocks.{len(model.layers) - 1}.hook_resid_post"
    everything = run_with_hooks(model, OTHER[None], {last: patch(cache[last])})
    np.testing.assert_array_equal(np.array(everything), np.array(clean))
    nothing = mx.zeros((1, 12), dtype=mx.bool_)
    none = run_with_hooks(model, OTHER[None], {"blocks.0.hook_mlp_out": patch(cache[
        "blocks.0.hook_mlp_out"], nothing)})  # fmt: skip
    np.testing.assert_array_equal(np.array(none), np.array(corrupt))


def test_patching_one_position_leaves_earlier_positions_alone(model):
    _, clean = run_with_cache(model, IDS[None])
    _, base = run_with_cache(model, OTHER[None])
    name = "blocks.0.hook_attn_out"
    _, hit = run_with_cache(model, OTHER[None], {name: patch(clean[name], [6])})
    after = np.array(hit[f"blocks.{len(model.layers) - 1}.hook_resid_post"])[0]
    before = np.array(base[f"blocks.{len(model.layers) - 1}.hook_resid_post"])[0]
    np.testing.assert_array_equal(after[:6], before[:6])
    assert np.abs(after[6:] - before[6:]).min(axis=-1).max() > 0


def test_patching_one_head_touches_only_that_head(model):
    _, clean = run_with_cache(model, IDS[None])
    name = "blocks.1.attn.hook_z"
    _, hit = run_with_cache(model, OTHER[None], {name: patch(clean[name], None, [2])})
    z, want = np.array(hit[name])[0], np.array(clean[name])[0]
    np.testing.assert_array_equal(z[:, 2], want[:, 2])
    _, base = run_with_cache(model, OTHER[None], names=[name])
    np.testing.assert_array_equal(np.delete(z, 2, axis=1), np.delete(np.array(base[name])[0], 2, 1))


def test_causal_trace_ends(model):
    span = range(2, 4)
    noise = tracing.subject_noise(model, 12, span, samples=4)
    result = tracing.causal_trace(model, IDS, ANSWER, tracing.Corruption(IDS, noise), window=2)
    p = np.array(mx.softmax(model(IDS[None])[0, -1], axis=-1))[ANSWER]
    assert result["clean_prob"] == pytest.approx(float(p), rel=1e-5)
    # Restoring the last block's output at the last position is the clean run exactly.
    assert result["resid"][-1, -1] == pytest.approx(result["clean_prob"], rel=1e-6)
    # Positions before the subject are not corrupted: restoring them gives the corrupted run.
    np.testing.assert_allclose(result["resid"][:, :2], result["corrupt_prob"], rtol=1e-6)
    np.testing.assert_allclose(result["mlp"][:, :2], result["corrupt_prob"], rtol=1e-6)
    assert result["clean_prob"] != pytest.approx(result["corrupt_prob"], rel=1e-3)
    for kind in ("resid", "mlp", "attn", "mlp_window"):
        assert result[kind].shape == (len(model.layers), 12)
    assert list(tracing.window_layers(0, 3, 6)) == [0, 1] and list(
        tracing.window_layers(3, 3, 6)) == [2, 3, 4]  # fmt: skip


def test_causal_trace_in_chunks_is_the_same(model, monkeypatch):
    assert tracing.positions_per_run(1024, 10, 12) == 1
    assert tracing.positions_per_run(12, 10, 4) == 12
    corruption = tracing.Corruption(OTHER)
    whole = tracing.causal_trace(model, IDS, ANSWER, corruption, window=2)
    monkeypatch.setattr(tracing, "positions_per_run", lambda *a: 5)  # 12 positions: 5 + 5 + 2
    chunked = tracing.causal_trace(model, IDS, ANSWER, corruption, window=2)
    for kind in ("resid", "mlp", "attn", "mlp_window"):
        np.testing.assert_allclose(chunked[kind], whole[kind], rtol=1e-5, atol=1e-7)


def test_direct_logit_attribution_sums_to_the_logit():
    for name in ("gpt2", "llama-gqa"):
        model = random_model(tiny_config(**CONFIGS[name]))
        dla = tracing.logit_attribution(model, IDS, ANSWER)
        total = dla["heads"].sum() + dla["mlp"].sum() + dla["embed"] + dla["pos_embed"]
        total += dla["biases"]
        assert total == pytest.approx(dla["logit"], abs=1e-4), name
        assert dla["logit"] == pytest.approx(float(model(IDS[None])[0, -1, ANSWER]), abs=1e-5)


# -- against TransformerLens -----------------------------------------------------------------------


LENS_MODELS = {
    "gpt2": lambda transformers: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(**{**HF_GPT2, "n_layer": 3}, bos_token_id=0, eos_token_id=0)
    ),
    "llama": lambda transformers: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**HF_LLAMA, bos_token_id=0, eos_token_id=0)
    ),
}


@pytest.fixture(scope="module", params=list(LENS_MODELS))
def lens_pair(request, tmp_path_factory):
    """The same tiny random Hugging Face model, booted by TransformerLens's bridge from a folder
    and imported by us."""
    pytest.importorskip("transformer_lens")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformer_lens.model_bridge import TransformerBridge

    from mlx_transformer.checkpoint.hf import import_hf

    folder = tmp_path_factory.mktemp(f"{request.param}_lens")
    hf = save_hf_model(lambda: LENS_MODELS[request.param](transformers), folder)
    words = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({f"t{i}": i for i in range(97)}, unk_token="t0")
    )
    words.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, eos_token="t0", unk_token="t0"
    ).save_pretrained(folder)
    bridge = TransformerBridge.boot_transformers(str(folder), device="cpu")
    return bridge, import_hf(folder), hf, torch


MAPPED = ["hook_embed", "hook_pos_embed", "ln_final.hook_out"] + [
    f"blocks.{{l}}.{n}" for n in (
        "hook_resid_pre", "ln1.hook_out", "attn.hook_q", "attn.hook_k", "attn.hook_v",
        "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid", "mlp.hook_pre",
        "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
    )
]  # fmt: skip


def errors_against_lens(lens_pair) -> dict[str, float]:
    """Largest absolute difference per comparison (the test's and the report's numbers)."""
    bridge, ours, hf, torch = lens_pair
    ids, answer = IDS, ANSWER
    tokens = torch.tensor(np.array(ids)[None])
    corrupt_tokens = torch.tensor(np.array(OTHER)[None])
    with torch.no_grad():
        tl_logits, tl_cache = bridge.run_with_cache(tokens)
    logits, cache = run_with_cache(ours, ids[None])
    err = {"logits": np.abs(np.array(logits) - tl_logits.numpy()).max()}
    n = len(ours.layers)
    names = [m.format(l=i) for m in MAPPED for i in range(n)]
    names = [name for name in dict.fromkeys(names) if name in cache]  # e.g. no hook_pos_embed
    assert len(names) >= 13 * n
    for name in names:
        theirs = tl_cache[name].detach().numpy()
        mine = np.array(cache[name])
        assert mine.shape == theirs.shape, name
        key = "patterns" if name.endswith("hook_pattern") else "activations"
        err[key] = max(err.get(key, 0.0), np.abs(mine - theirs).max())
    for i in range(n):  # the bridge calls the MLP's input mlp.hook_in
        theirs = tl_cache[f"blocks.{i}.mlp.hook_in"].detach().numpy()
        err["activations"] = max(
            err["activations"], np.abs(np.array(cache[f"blocks.{i}.hook_mlp_in"]) - theirs).max()
        )

    # Logit lens: their cached residual streams through the final norm and unembedding.
    lens = analysis.logit_lens(ours, ids[None])
    final_norm = hf.transformer.ln_f if hasattr(hf, "transformer") else hf.model.norm
    with torch.no_grad():
        stages = [tl_cache["blocks.0.hook_resid_pre"]] + [
            tl_cache[f"blocks.{i}.hook_resid_post"] for i in range(n)
        ]
        theirs = np.stack([hf.lm_head(final_norm(s)).log_softmax(-1).numpy()
                           for s in stages])  # fmt: skip
    err["logit_lens"] = np.abs(lens - theirs).max()

    # Direct logit attribution: their per-head results and MLP outputs, centred (LayerNorm) and
    # divided by the final norm's cached scale (apply_ln_to_stack), along its weight * W_U[:, a].
    dla = tracing.logit_attribution(ours, ids, answer)
    with torch.no_grad():
        heads = tl_cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)[:, 0]
        mlps = torch.stack([tl_cache[f"blocks.{i}.hook_mlp_out"][0, -1] for i in range(n)])
        mlps = tl_cache.apply_ln_to_stack(mlps[:, None], layer=-1, pos_slice=-1)[:, 0]
        direction = final_norm.weight * hf.lm_head.weight[answer]
        tl_heads = (heads @ direction).numpy().reshape(n, -1)
        tl_mlp = (mlps @ direction).numpy()
    err["dla"] = max(np.abs(dla["heads"] - tl_heads).max(), np.abs(dla["mlp"] - tl_mlp).max())

    # Activation patching (transformer_lens.patching) on a prompt pair, metric P(answer).
    import transformer_lens.patching as patching

    with torch.no_grad():
        _, tl_clean = bridge.run_with_cache(tokens)

        def metric(lg):
            return lg[0, -1].softmax(-1)[answer]

        tl = {
            "heads": patching.get_act_patch_attn_head_out_all_pos(
                bridge, corrupt_tokens, tl_clean, metric),
            "resid": patching.get_act_patch_resid_pre(bridge, corrupt_tokens, tl_clean, metric),
            "mlp": patching.get_act_patch_mlp_out(bridge, corrupt_tokens, tl_clean, metric),
            "attn": patching.get_act_patch_attn_out(bridge, corrupt_tokens, tl_clean, metric),
        }  # fmt: skip
    corruption = tracing.Corruption(OTHER)
    trace = tracing.causal_trace(ours, ids, answer, corruption, window=1)
    heads_patched = tracing.head_patching(ours, ids, answer, corruption)
    err["patching"] = max(
        np.abs(heads_patched - tl["heads"].numpy()).max(),
        # our "resid" restores block l's output = TransformerLens's resid_pre of block l + 1
        np.abs(trace["resid"][:-1] - tl["resid"].numpy()[1:]).max(),
        np.abs(trace["mlp"] - tl["mlp"].numpy()).max(),
        np.abs(trace["attn"] - tl["attn"].numpy()).max(),
    )
    return {k: float(v) for k, v in err.items()}


@pytest.mark.slow
def test_cache_lens_attribution_and_patching_match_transformer_lens(lens_pair):
    err = errors_against_lens(lens_pair)
    print(json.dumps(err))
    assert set(err) == {"logits", "activations", "patterns", "logit_lens", "dla", "patching"}
    assert max(err.values()) <= 1e-4, err


# -- the command -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer_path):
    from mlx_transformer.tokenizer import Tokenizer

    vocab = Tokenizer.load(tiny_tokenizer_path).vocab_size
    model = random_model(tiny_config(vocab_size=vocab, max_position_embeddings=64))
    return save_checkpoint(tmp_path_factory.mktemp("trace") / "ckpt", model,
                           tokenizer_path=tiny_tokenizer_path)  # fmt: skip


PROMPT = "First Citizen: speak, speak."


def trace_args(ckpt, out, *extra):
    return ["inspect", "--model", str(ckpt), "--prompt", PROMPT, "--out", str(out), "--trace",
            *extra]  # fmt: skip


@pytest.mark.slow
def test_trace_command_writes_heatmaps_numbers_and_summary(checkpoint, tmp_path, capsys):
    from mlx_transformer.tokenizer import Tokenizer

    out = tmp_path / "trace"
    args = trace_args(checkpoint, out, "--answer", " All", "--subject", "Citizen", "--samples", "3")
    assert cli_main(args) == 0
    for name in ("trace.png", "head_patching.png", "logit_attribution.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    report = json.loads((out / "trace.json").read_text())
    assert np.array(report["resid"]).shape == (2, len(report["tokens"]))
    assert np.array(report["head_patching"]).shape == (2, 4)
    assert report["subject_positions"] and report["logit_attribution"]["heads"]
    printed = capsys.readouterr().out
    assert "restoring one clean state" in printed and "direct logit attribution" in printed
    assert (out / "summary.txt").read_text() in printed
    # A counterfactual prompt of as many tokens, replacing the earlier trace only with --overwrite.
    tokenizer = Tokenizer.load(checkpoint / "tokenizer.model")
    n = len(tokenizer.encode(PROMPT))
    candidates = [PROMPT.replace("First", w) for w in ("Second", "Third", "Fifth", "Last")]
    corrupt = next(c for c in candidates if len(tokenizer.encode(c)) == n)
    args = trace_args(checkpoint, out, "--answer", " All", "--corrupt", corrupt)
    before = snapshot(out)
    assert cli_main(args) == 2 and snapshot(out) == before
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(args + ["--overwrite"]) == 0
    assert json.loads((out / "trace.json").read_text())["corrupt"] is not None


def snapshot(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--answer", "x"], "exactly one of --subject"),
        (["--answer", "x", "--subject", "Citizen", "--corrupt", "y"], "exactly one of --subject"),
        (["--answer", "", "--subject", "Citizen"], "--answer is empty"),
        (["--answer", "x", "--subject", "Romeo"], "'Romeo' is not in the prompt"),
        (["--answer", "x", "--corrupt", "Hi."], "as many tokens"),
        (["--answer", "x", "--corrupt", PROMPT], "the same text"),
        (["--answer", "x", "--subject", "Citizen", "--samples", "0"], "--samples"),
        (["--answer", "x", "--subject", "Citizen", "--window", "5"], "--window 5"),
        (["--subject", "Citizen"], "--trace needs --answer"),
    ],
)
def test_trace_flags_are_one_line_errors_and_leave_the_output_alone(
    checkpoint, tmp_path, capsys, extra, message
):
    out = tmp_path / "trace"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = trace_args(checkpoint, tmp_path / "new", *extra)
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "new").exists()
    # A folder holding someone else's file is never replaced, --overwrite or not.
    args = trace_args(checkpoint, out, "--answer", " All", "--subject", "Citizen", "--overwrite")
    assert cli_main(args) == 2
    assert snapshot(out) == {"keep.txt": hashlib.sha256(b"mine").hexdigest()}


@pytest.mark.parametrize("flag", [["--answer", "x"], ["--subject", "x"], ["--overwrite"]])
def test_trace_flags_without_trace_are_refused(checkpoint, tmp_path, capsys, flag):
    args = ["inspect", "--model", str(checkpoint), "--prompt", PROMPT, "--out",
            str(tmp_path / "o"), *flag]  # fmt: skip
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert f"{flag[0]} is for causal tracing; add --trace" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_multi_token_answer_traces_its_first_token_and_says_so(checkpoint, tmp_path, capsys):
    out = tmp_path / "trace"
    args = trace_args(checkpoint, out, "--answer", " All speak", "--subject", "Citizen",
                      "--samples", "2")  # fmt: skip
    assert cli_main(args) == 0
    assert "tracing its first" in capsys.readouterr().out
    assert json.loads((out / "trace.json").read_text())["answer"] == " All speak"
