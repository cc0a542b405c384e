"""The export folder loads, unchanged, in the standard runtimes (the real clients, installed by
the `test` extra): onnxruntime-genai reproduces MLX's greedy generation token for token, and its
logits match MLX's within the fp32 tolerance. (optimum, which needs an older transformers, runs
from its own venv: tests/test_optimum.py; transformers.js and the browser: tests/test_web.py.)

Shapes: GPT-2, Llama with grouped-query attention, and the paper's decoder (post-norm,
sinusoidal, ReLU), each in both flavours, with a BPE tokenizer (so eos/bos/pad ids are real).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from test_model import CONFIGS, random_model, tiny_config

from export import export_onnx
from export.deploy import GENAI_CONFIG_FILE, HF_CONFIG_FILE
from mlx_transformer.checkpoint.mlx_io import save_checkpoint
from mlx_transformer.generate.api import generate_step
from mlx_transformer.tokenizer import Tokenizer

SHAPES = ["gpt2", "llama-gqa", "paper"]
FLAVOURS = ["portable", "ort"]
TOKENS = 32
ATOL, RTOL = 1e-4, 1e-3  # fp32 logits, as verify
PROMPT = "ROMEO: But soft,"
_cache: dict = {}


def deployed(name: str, flavour: str, tokenizer_path, tmp_path_factory):
    """(MLX model, tokenizer, export folder) for a shape, built once per session."""
    key = (name, flavour)
    if key not in _cache:
        tokenizer = Tokenizer.load(tokenizer_path)
        config = tiny_config(
            **CONFIGS[name], vocab_size=tokenizer.vocab_size, max_position_embeddings=64
        )
        model = random_model(config, seed=3)
        ckpt = tmp_path_factory.mktemp(f"ckpt-{name}")
        save_checkpoint(ckpt, model, tokenizer_path=tokenizer_path)
        out = tmp_path_factory.mktemp(f"deploy-{name}-{flavour}")
        export_onnx(ckpt, out, flavour=flavour)
        _cache[key] = (model, tokenizer, out)
    return _cache[key]


@pytest.fixture(params=[(s, f) for s in SHAPES for f in FLAVOURS], ids=lambda p: "-".join(p))
def case(request, tiny_tokenizer_path, tmp_path_factory):
    return deployed(*request.param, tiny_tokenizer_path, tmp_path_factory)


def mlx_greedy(model, tokenizer, prompt: list[int]) -> list[int]:
    """`mlx-transformer generate --temp 0`'s tokens: greedy, up to EOS (not included)."""
    tokens = []
    for token in generate_step(prompt, model, max_tokens=TOKENS):
        if token == tokenizer.eos_id:
            break
        tokens.append(int(token))
    return tokens


def mlx_logits(model, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array([ids]), attention_mask=mx.array([[1] * len(ids)])))[0]


def test_folder_holds_the_files_each_runtime_reads(case):
    model, tokenizer, out = case
    hf = json.loads((out / HF_CONFIG_FILE).read_text())
    genai = json.loads((out / GENAI_CONFIG_FILE).read_text())
    c = model.config
    assert hf["model_type"] in ("gpt2", "llama")
    assert hf["eos_token_id"] == tokenizer.eos_id == genai["model"]["eos_token_id"]
    assert genai["model"]["type"] == "llama"
    assert genai["model"]["context_length"] == c.max_position_embeddings
    decoder = genai["model"]["decoder"]
    assert (decoder["head_size"], decoder["num_key_value_heads"]) == (
        c.head_dim,
        c.num_key_value_heads,
    )
    assert (out / decoder["filename"]).is_file()
    ours = json.loads((out / "mlx_transformer_config.json").read_text())
    assert ours["num_hidden_layers"] == c.num_hidden_layers
    # The ort graph appends to its past in place: genai may hand it one shared buffer.
    flavour = json.loads((out / "io.json").read_text())["flavour"]
    assert genai["search"]["past_present_share_buffer"] == (flavour == "ort")


def test_hugging_face_config_loads_in_transformers(case):
    """AutoConfig reads it as a standard family, with the KV-cache dims of the graph."""
    transformers = pytest.importorskip("transformers")
    model, _, out = case
    hf = transformers.AutoConfig.from_pretrained(out)
    c = model.config
    assert hf.num_hidden_layers == c.num_hidden_layers
    assert hf.num_attention_heads == c.num_attention_heads
    assert getattr(hf, "num_key_value_heads", hf.num_attention_heads) == c.num_key_value_heads
    assert getattr(hf, "head_dim", hf.hidden_size // hf.num_attention_heads) == c.head_dim


def test_onnxruntime_genai_greedy_matches_mlx(case):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai (the test extra)")
    model, tokenizer, out = case
    prompt = tokenizer.encode_prompt(PROMPT)
    want = mlx_greedy(model, tokenizer, prompt)
    genai_model = og.Model(str(out))
    params = og.GeneratorParams(genai_model)
    params.set_search_options(max_length=len(prompt) + TOKENS)  # greedy: the config's default
    generator = og.Generator(genai_model, params)
    generator.append_tokens(prompt)
    # The prompt's logits (genai exposes the last call's output) against MLX's.
    prefill = np.asarray(generator.get_output("logits"))[0, -1]
    np.testing.assert_allclose(prefill, mlx_logits(model, prompt)[-1], atol=ATOL, rtol=RTOL)
    while not generator.is_done():
        generator.generate_next_token()
    got = [int(t) for t in generator.get_sequence(0)[len(prompt) :]]
    if got and got[-1] == tokenizer.eos_id:
        got = got[:-1]
    assert got == want
    step = np.asarray(generator.get_output("logits"))[0, -1]  # the last decode step's
    np.testing.assert_allclose(step, mlx_logits(model, prompt + got[:-1])[-1], atol=ATOL, rtol=RTOL)


GENAI_TOKENIZER_PROBES = ["ROMEO: But soft,", "a b", " a", "x\ny", "caf\u00e9 \u4e2d", "But"]


def test_onnxruntime_genai_tokenizer_gives_sentencepiece_ids(tiny_tokenizer_path, tmp_path_factory):
    """onnxruntime-genai's own tokenizer reads the folder's tokenizer.json (spaces spelled "▁"
    with a Replace normalizer, as Llama 2's) and gives sentencepiece's ids."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai (the test extra)")
    _, tokenizer, out = deployed("llama-gqa", "portable", tiny_tokenizer_path, tmp_path_factory)
    genai_tokenizer = og.Tokenizer(og.Model(str(out)))
    for text in GENAI_TOKENIZER_PROBES:
        ids = tokenizer.encode(text)
        assert [int(i) for i in genai_tokenizer.encode(text)] == ids, text
        assert genai_tokenizer.decode(np.array(ids, np.int32)) == text, text


def test_readme_says_what_config_json_describes(tiny_tokenizer_path, tmp_path_factory):
    """No Hugging Face family describes the paper's decoder: the folder says so."""
    for name, exact in (("gpt2", True), ("llama-gqa", True), ("paper", False)):
        _, _, out = deployed(name, "portable", tiny_tokenizer_path, tmp_path_factory)
        readme = (out / "README.md").read_text()
        io = json.loads((out / "io.json").read_text())
        assert ("describes the ONNX graph's interface only" in readme) is not exact, name
        assert ("interface only" in io["deploy"]["config.json"]) is not exact, name
        hf = json.loads((out / HF_CONFIG_FILE).read_text())
        assert ("mlx_transformer_note" in hf) is not exact, name
        assert io["deploy"]["tokenizer.json"].startswith("written"), io["deploy"]


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_onnxruntime_genai_runs_lower_precisions(precision, tiny_tokenizer_path, tmp_path):
    """Each precision's file (transformers.js's name) loads in genai, which generates what our
    runtime generates from the same file; agreement with MLX is io.json's precision report."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai (the test extra)")
    from export.contract import model_file
    from export.runtime import OnnxGenerator

    tokenizer = Tokenizer.load(tiny_tokenizer_path)
    config = tiny_config(**CONFIGS["llama-gqa"], vocab_size=tokenizer.vocab_size)
    ckpt = save_checkpoint(tmp_path / "ckpt", random_model(config, seed=3), tiny_tokenizer_path)
    out = tmp_path / "onnx"
    info = export_onnx(ckpt, out, flavour="ort", precision=precision)
    assert info["model"] == model_file(precision) and (out / info["model"]).is_file()
    genai = json.loads((out / GENAI_CONFIG_FILE).read_text())
    assert genai["model"]["decoder"]["filename"] == info["model"]
    prompt = tokenizer.encode_prompt(PROMPT)
    n = 16
    want = OnnxGenerator(out).generate_tokens([prompt], max_tokens=n)[0].tokens
    genai_model = og.Model(str(out))
    params = og.GeneratorParams(genai_model)
    params.set_search_options(max_length=len(prompt) + n)
    generator = og.Generator(genai_model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    got = [int(t) for t in generator.get_sequence(0)[len(prompt) :]]
    if got and got[-1] == tokenizer.eos_id:
        got = got[:-1]
    assert got == want
    assert "argmax_agreement" in info["precision_report"]


@pytest.mark.slow
def test_one_folder_holds_several_precisions(tiny_tokenizer_path, tmp_path, capsys):
    """`--precision` repeated: a graph per precision under transformers.js's names; the first
    is what runtimes load by default; onnx-generate and verify pick one with --precision."""
    from export.contract import model_file
    from export.runtime import OnnxGenerator
    from mlx_transformer.cli import main

    tokenizer = Tokenizer.load(tiny_tokenizer_path)
    config = tiny_config(**CONFIGS["gpt2"], vocab_size=tokenizer.vocab_size)
    model = random_model(config, seed=3)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tiny_tokenizer_path)
    out = tmp_path / "onnx"
    argv = ["export", str(ckpt), str(out)]
    assert main(argv + ["--precision", "fp32", "--precision", "fp16", "--precision", "int4"]) == 0
    io = json.loads((out / "io.json").read_text())
    assert list(io["precisions"]) == ["fp32", "fp16", "int4"]
    assert io["model"] == model_file("fp32") and "precision_report" in io["precisions"]["int4"]
    files = sorted(p.name for p in (out / "onnx").iterdir())
    assert files == ["model.onnx", "model_fp16.onnx", "model_q4.onnx"]
    readme = (out / "README.md").read_text()
    assert "onnx/model_q4.onnx" in readme and "onnx/model.onnx" in readme
    prompt = tokenizer.encode_prompt(PROMPT)
    want = mlx_greedy(model, tokenizer, prompt)
    assert OnnxGenerator(out).generate_tokens([prompt], max_tokens=TOKENS)[0].tokens == want
    int4 = OnnxGenerator(out, precision="int4")
    assert int4.model.io["model"] == model_file("int4") and int4.model.io["precision"] == "int4"
    # (int4 of a random model is past verify's int4 budget, as for any other checkpoint)
    verify = ["verify", str(ckpt), str(out), "--provider", "cpu", "--tokens", "8"]
    assert main([*verify, "--precision", "fp16"]) == 0
    assert (out / "verify-fp16.md").is_file() and not (out / "verify.md").exists()
    capsys.readouterr()
    argv = ["onnx-generate", str(out), "--prompt", "x", "--precision", "int8"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds fp32, fp16, int4, not int8" in err, err


def test_io_json_precisions_outside_the_folder_are_one_line(
    tiny_tokenizer_path, tmp_path_factory, tmp_path, capsys
):
    """A precision's file must lie inside the folder, as io.json's "model" must."""
    import shutil

    from mlx_transformer.cli import main

    _, _, out = deployed("gpt2", "portable", tiny_tokenizer_path, tmp_path_factory)
    folder = tmp_path / "export"
    shutil.copytree(out, folder)
    io = json.loads((folder / "io.json").read_text())
    io["precisions"]["fp32"]["model"] = "../../etc/passwd"
    (folder / "io.json").write_text(json.dumps(io))
    capsys.readouterr()
    assert main(["onnx-generate", str(folder), "--prompt", "a", "--precision", "fp32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "precisions is not an object" in err, err
