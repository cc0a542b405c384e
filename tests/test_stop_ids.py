"""Several stop ids: a Hugging Face model's generation_config.json may list more than one
eos_token_id (Llama 3 Instruct: <|eot_id|> and <|end_of_text|>; Qwen2.5 Instruct: <|im_end|> and
<|endoftext|>). `convert --from-hf` keeps the list with the tokenizer; MLX generation (the CLI and
the Python API), `onnx-generate`, onnxruntime-genai (genai_config.json) and the web page stop at
any of them."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import save_hf_model
from hf_tokenizer_folders import byte_level_folder

from mlx_transformer.cli import main
from mlx_transformer.tokenizer_files import load_tokenizer

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "ROMEO:\nWhat light"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, tiny_corpus_text) -> Path:
    """A tiny random Llama saved by transformers with a byte-level BPE tokenizer whose eos is
    <|im_end|>, and a generation_config.json that also stops at <|endoftext|>, as Qwen2.5
    Instruct's does."""
    root = tmp_path_factory.mktemp("stop-ids")
    tok_dir = byte_level_folder(root / "tokenizer", tiny_corpus_text, vocab_size=500)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=hf_tok.eos_token_id,
    )
    folder = root / "hf"
    save_hf_model(lambda: transformers.LlamaForCausalLM(config), folder, o1_weights=False)
    hf_tok.save_pretrained(folder)
    eos = [hf_tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    _set_eos(folder, eos)
    return folder


def _set_eos(folder: Path, eos) -> None:
    path = folder / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**config, "eos_token_id": eos}, indent=2))


def test_eos_ids_come_from_generation_config(tmp_path, tiny_corpus_text):
    """eos_ids: the tokenizer's eos, then generation_config.json's others (an id or a list,
    repeats dropped); the file travels with the tokenizer; a value that is no id is one line."""
    from mlx_transformer.errors import UserError
    from mlx_transformer.tokenizer_files import copy_tokenizer

    folder = byte_level_folder(tmp_path / "tok", tiny_corpus_text, vocab_size=300)
    eos, other = (load_tokenizer(folder).piece_to_id(t) for t in ("<|im_end|>", "<|endoftext|>"))
    assert load_tokenizer(folder).eos_ids == (eos,)
    for listed, want in ((other, (eos, other)), ([other, eos], (eos, other)), ([], (eos,))):
        _set_eos(folder, listed)
        assert load_tokenizer(folder).eos_ids == want, listed
    _set_eos(folder, [eos, other])
    copy = tmp_path / "copy"
    copy.mkdir()
    assert "generation_config.json" in copy_tokenizer(folder, copy)
    assert load_tokenizer(copy).eos_ids == (eos, other)
    for bad in ("<|endoftext|>", [eos, -1], [True]):
        _set_eos(folder, bad)
        with pytest.raises(UserError, match="generation_config.json: eos_token_id is"):
            load_tokenizer(folder)


@pytest.mark.slow
def test_convert_keeps_every_eos_id(hf_folder, tmp_path, capsys):
    """The tokenizer's eos first, then generation_config.json's others; a list that is not of
    ids is one line naming the file, and nothing is written."""
    ckpt = tmp_path / "ckpt"
    assert main(["convert", "--from-hf", str(hf_folder), "--out", str(ckpt)]) == 0
    tok = load_tokenizer(ckpt)
    want = tuple(tok.piece_to_id(t) for t in ("<|im_end|>", "<|endoftext|>"))
    assert tok.eos_ids == want and tok.eos_id == want[0]
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-r", str(hf_folder), str(bad)], check=True)
    _set_eos(bad, [want[0], "<|endoftext|>"])
    capsys.readouterr()
    assert main(["convert", "--from-hf", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "generation_config.json: eos_token_id is" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_generation_stops_at_the_second_eos_id(hf_folder, tmp_path, capsys):
    """A model whose greedy continuation reaches an id that only generation_config.json lists
    as eos: every generator stops just before it, with the same tokens and text."""
    from export.runtime import OnnxGenerator
    from mlx_transformer.checkpoint.mlx_io import load_checkpoint
    from mlx_transformer.generate.api import batch_generate, generate_step

    ckpt, onnx = tmp_path / "ckpt", tmp_path / "onnx"
    assert main(["convert", "--from-hf", str(hf_folder), "--out", str(ckpt)]) == 0
    model, tok = load_checkpoint(ckpt), load_tokenizer(ckpt)
    ids = tok.encode_prompt(PROMPT)
    full = [int(t) for t in generate_step(ids, model, max_tokens=MAX_TOKENS)]
    # The stop id: the first new token a few steps in (the tokenizer's eos is never reached).
    k = next(i for i, t in enumerate(full) if i >= 3 and t not in full[:i])
    assert tok.eos_id not in full[:k]
    second = full[k]
    _set_eos(ckpt, [tok.eos_id, second])
    tok = load_tokenizer(ckpt)
    assert tok.eos_ids == (tok.eos_id, second)
    want = tok.decode(full[:k])

    # MLX: the Python API and the CLI.
    result = batch_generate(model, tok, [PROMPT], max_tokens=MAX_TOKENS)
    assert result.token_ids[0] == full[:k] and result.finish_reasons == ["stop"]
    assert result.texts == [want]
    capsys.readouterr()
    assert main(["generate", "--model", str(ckpt), "--prompt", PROMPT, "--temp", "0",
                 "--max-tokens", str(MAX_TOKENS)]) == 0  # fmt: skip
    assert capsys.readouterr().out == want + "\n"

    # The export: its files list both ids; our runtime and its CLI stop at the second.
    assert main(["export", str(ckpt), str(onnx)]) == 0
    for name, key in (("generation_config.json", None), ("genai_config.json", "model")):
        config = json.loads((onnx / name).read_text())
        assert (config[key] if key else config)["eos_token_id"] == [tok.eos_id, second], name
    got = OnnxGenerator(onnx).generate(PROMPT, MAX_TOKENS)[0]
    assert (got.tokens, got.text, got.finish_reason) == (full[:k], want, "eos")
    done = subprocess.run(
        [sys.executable, "-m", "mlx_transformer", "onnx-generate", str(onnx), "--prompt", PROMPT,
         "--max-tokens", str(MAX_TOKENS)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == PROMPT + want + "\n"
    print(f"stopped after {k} of {MAX_TOKENS} tokens at the second eos id {second}")

    if importlib.util.find_spec("onnxruntime_genai") is not None:
        import onnxruntime_genai as og

        og_model = og.Model(str(onnx))
        params = og.GeneratorParams(og_model)
        params.set_search_options(do_sample=False, max_length=len(ids) + MAX_TOKENS)
        generator = og.Generator(og_model, params)
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
        og_ids = [int(t) for t in generator.get_sequence(0)[len(ids) :]]
        assert og_ids in (full[:k], full[: k + 1]), og_ids  # with the eos id or without

    from test_web import CHROMIUM, cli, run_page

    if CHROMIUM is not None:
        web = tmp_path / "web"
        cli("web", str(onnx), str(web))
        assert json.loads((web / "web.json").read_text())["eos_ids"] == [tok.eos_id, second]
        request = dict(prompt=PROMPT, maxTokens=MAX_TOKENS, temp=0)
        page = run_page(web, tmp_path, [request])["results"][0]
        assert (page["tokens"], page["text"], page["finishReason"]) == (full[:k], want, "eos")
