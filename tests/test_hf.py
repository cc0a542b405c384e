"""Parity with a reference nobody here wrote: tiny random Hugging Face GPT-2 and Llama models."""

from __future__ import annotations

import hashlib
import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import HF_GPT2, HF_LLAMA, save_hf_model
from test_hf_tokenizer import PROBES
from test_model import CONFIGS, random_model, tiny_config

from mlx_transformer.checkpoint.hf import import_hf, save_hf
from mlx_transformer.checkpoint.mlx_io import load_checkpoint, save_checkpoint
from mlx_transformer.cli import main as cli_main
from mlx_transformer.data.tokenizer_training import train_tokenizer
from mlx_transformer.errors import UserError
from mlx_transformer.generate.api import generate_step
from mlx_transformer.tokenizer import Tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF_MODELS = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_GPT2)),
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**HF_LLAMA, rope_theta=10000.0)
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
    folder = tmp_path_factory.mktemp(request.param)
    model = save_hf_model(HF_MODELS[request.param], folder)
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


# -- the folder `convert --to-hf` writes, in the runtimes that read it ----------------------------

GREEDY_TOKENS = 32
PROMPT = "ROMEO: But soft,"
# (model shape, tokenizer): GPT-2 and Llama with grouped-query attention, BPE and char.
FOLDERS = [("gpt2", "bpe"), ("llama-gqa", "bpe"), ("llama-gqa", "char")]


@pytest.fixture(scope="module", params=FOLDERS, ids=lambda p: "-".join(p))
def converted(request, tmp_path_factory, tiny_tokenizer_path, tiny_char_tokenizer_path):
    """(our model, our tokenizer, the folder `convert --to-hf` wrote from its checkpoint)."""
    name, kind = request.param
    path = tiny_tokenizer_path if kind == "bpe" else tiny_char_tokenizer_path
    tokenizer = Tokenizer.load(path)
    config = tiny_config(**CONFIGS[name], vocab_size=tokenizer.vocab_size)
    model = random_model(config, seed=5)
    ckpt = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(ckpt, model, tokenizer_path=path)
    out = tmp_path_factory.mktemp("hf") / "out"
    assert cli_main(["convert", "--to-hf", str(ckpt), "--out", str(out), "--for", "mlx-lm"]) == 0
    return model, tokenizer, out


def our_greedy(model, tokenizer, prompt: list[int]) -> list[int]:
    """`mlx-transformer generate --temp 0`'s tokens, up to EOS (not included)."""
    tokens = []
    for token in generate_step(prompt, model, max_tokens=GREEDY_TOKENS):
        if token == tokenizer.eos_id:
            break
        tokens.append(int(token))
    return tokens


def test_converted_folder_holds_tokenizer_and_generation_files(converted):
    model, tokenizer, out = converted
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "README.md",
    } <= names
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)
    assert (out / "tokenizer.model").read_bytes() == tokenizer.model_bytes
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 3)


def test_transformers_loads_converted_folder(converted):
    """Model logits within 1e-4 of ours, AutoTokenizer ids == ours, greedy tokens == ours."""
    model, tokenizer, out = converted
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.random.default_rng(6).integers(0, tokenizer.vocab_size, (2, 40))
    got = hf_logits(hf_model, ids)
    assert np.abs(got - np.array(model(mx.array(ids)))).max() <= 1e-4
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for text in PROBES:
        assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text), text
    prompt = tokenizer.encode_prompt(PROMPT)
    with torch.no_grad():
        generated = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=GREEDY_TOKENS,
        )[0, len(prompt) :].tolist()
    if tokenizer.eos_id in generated:
        generated = generated[: generated.index(tokenizer.eos_id)]
    assert generated == our_greedy(model, tokenizer, prompt)


def test_mlx_lm_loads_converted_folder(converted):
    """mlx-lm's own `load` (model and tokenizer): logits within 1e-4, ids and greedy tokens ours.
    (Tokens, not text: a random model emits invalid UTF-8 bytes, which decoders render
    differently; valid text round-trips in test_hf_tokenizer.py.)"""
    mlx_lm = pytest.importorskip("mlx_lm")
    model, tokenizer, out = converted
    theirs, their_tokenizer = mlx_lm.load(str(out))
    ids = mx.array(np.random.default_rng(7).integers(0, tokenizer.vocab_size, (2, 40)))
    assert np.abs(np.array(theirs(ids)) - np.array(model(ids))).max() <= 1e-4
    for text in PROBES:
        assert their_tokenizer.encode(text) == tokenizer.encode(text), text
    prompt = tokenizer.encode_prompt(PROMPT)
    steps = mlx_lm.stream_generate(theirs, their_tokenizer, prompt, max_tokens=GREEDY_TOKENS)
    generated = [step.token for step in steps]  # greedy by default; stops at eos, included
    if generated and generated[-1] == tokenizer.eos_id:
        generated.pop()
    assert generated == our_greedy(model, tokenizer, prompt)


def _sha256s(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


GPT2_MLX_LM_CANNOT = {
    "2x MLP": dict(hidden_act="gelu_tanh", intermediate_size=64),
    "exact GELU": dict(hidden_act="gelu"),
}


@pytest.mark.parametrize("overrides", GPT2_MLX_LM_CANNOT.values(), ids=GPT2_MLX_LM_CANNOT)
def test_gpt2_mlx_lm_cannot_load_is_refused_for_mlx_lm(overrides, tmp_path, capsys):
    model = random_model(tiny_config(**overrides))
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    save_checkpoint(ckpt, model)
    args = ["convert", "--to-hf", str(ckpt), "--out", str(out)]
    # Without --for it is written, transformers loads it, and the README says mlx-lm cannot.
    assert cli_main(args) == 0
    assert "does not load this model correctly" in (out / "README.md").read_text()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.random.default_rng(8).integers(0, 61, (1, 20))
    assert np.abs(hf_logits(hf_model, ids) - np.array(model(mx.array(ids)))).max() <= 1e-4
    # With --for mlx-lm: one line, exit 2, and the folder already there is left as it was.
    before = _sha256s(out)
    capsys.readouterr()
    assert cli_main([*args, "--overwrite", "--for", "mlx-lm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "mlx-lm cannot load this model correctly" in err and "mlx-lm's GPT-2" in err
    assert _sha256s(out) == before


def test_gpt2_refusal_is_real(tmp_path):
    """What --for mlx-lm refuses, mlx-lm indeed gets wrong: its GPT-2 ignores n_inner and the
    activation (a 2x MLP does not load; an exact-GELU model loads with other logits)."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    narrow = random_model(tiny_config(**GPT2_MLX_LM_CANNOT["2x MLP"]))
    save_hf(narrow, tmp_path / "narrow")
    with pytest.raises(ValueError):
        mlx_lm_utils.load_model(tmp_path / "narrow")
    exact = random_model(tiny_config(**GPT2_MLX_LM_CANNOT["exact GELU"]))
    save_hf(exact, tmp_path / "exact")
    theirs, _ = mlx_lm_utils.load_model(tmp_path / "exact")
    ids = mx.array(np.random.default_rng(9).integers(0, 61, (1, 20)))
    assert np.abs(np.array(theirs(ids)) - np.array(exact(ids))).max() > 1e-4  # our tolerance


def test_tokenizer_that_cannot_convert_exactly_is_refused(tmp_path, capsys, tiny_corpus_text):
    unigram = tmp_path / "unigram.model"
    train_tokenizer([tiny_corpus_text], unigram, vocab_size=400, model_type="unigram")
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    save_checkpoint(ckpt, random_model(tiny_config(vocab_size=400)), tokenizer_path=unigram)
    assert cli_main(["convert", "--to-hf", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unigram model" in err and "Traceback" not in err
    assert not out.exists()
    assert cli_main(["convert", "--to-hf", str(ckpt), "--out", str(out), "--tokenizer", "no"]) == 2
    assert "no: not found" in capsys.readouterr().err
    assert not out.exists()
