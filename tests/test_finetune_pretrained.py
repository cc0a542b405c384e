"""End to end on a pretrained-style model no test here trained: a tiny random Qwen2 saved by
transformers with a byte-level BPE tokenizer.json (trained with `tokenizers` on the packaged
corpus) and a chat template, then convert --from-hf -> prepare (chat JSONL, its tokenizer) ->
train --lora -> fuse -> generate --chat -> export -> onnx-generate --chat in a process where MLX
cannot be imported. Greedy text must be identical on both sides; transformers' tokenizer on the
converted folder must give our ids."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import BLOCK_MLX, save_hf_model
from hf_tokenizer_folders import byte_level_folder

from mlx_transformer.cli import main
from mlx_transformer.tokenizer_files import load_tokenizer

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Who speaks first?"

# Run a command of the CLI where `import mlx` fails, and check nothing of MLX was loaded.
NO_MLX = BLOCK_MLX + textwrap.dedent(
    """
    from mlx_transformer.cli import main

    code = main(sys.argv[1:])
    assert not any(m == "mlx" or m.startswith("mlx.") for m in sys.modules)
    sys.exit(code)
    """
)


def chats(n: int) -> list[dict]:
    lines = [
        ("Who speaks first?", "First Citizen."),
        ("What do they resolve?", "Rather to die than to famish."),
        ("Whom do they name?", "Caius Marcius, chief enemy to the people."),
        ("Is it verdict?", "No more talking on't; let it be done."),
    ]
    out = []
    for i in range(n):
        question, answer = lines[i % len(lines)]
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if i % 3 == 0:  # a two-turn conversation: both assistant turns are learned
            messages += [
                {"role": "user", "content": "Again?"},
                {"role": "assistant", "content": answer},
            ]
        out.append({"messages": messages})
    return out


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, tiny_corpus_text) -> Path:
    """A tiny random Qwen2ForCausalLM (bias on q/k/v) and its tokenizer, both saved with
    save_pretrained."""
    root = tmp_path_factory.mktemp("pretrained")
    tok_dir = byte_level_folder(root / "tokenizer", tiny_corpus_text, vocab_size=600)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    config = transformers.Qwen2Config(
        vocab_size=640,  # padded beyond the tokenizer's 600 ids, as pretrained models often are
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
    )
    folder = root / "hf"
    save_hf_model(lambda: transformers.Qwen2ForCausalLM(config), folder, o1_weights=False)
    hf_tok.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_finetune_a_pretrained_chat_model_end_to_end(hf_folder, tmp_path, capsys):
    from mlx_transformer.train.args import TrainingArgs
    from mlx_transformer.train.trainer import train

    ckpt, fused, onnx = tmp_path / "ckpt", tmp_path / "fused", tmp_path / "onnx"
    assert main(["convert", "--from-hf", str(hf_folder), "--out", str(ckpt)]) == 0
    assert (ckpt / "tokenizer.json").is_file() and not (ckpt / "tokenizer.model").exists()
    tok = load_tokenizer(ckpt)
    assert tok.chat_template is not None

    # The reference: transformers' own tokenizer, loaded from the converted checkpoint.
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(ckpt))
    texts = [PROMPT, "ROMEO:\nWhat, ho! 😀 é\n\n", *[json.dumps(c) for c in chats(4)]]
    for text in texts:
        assert tok.encode(text) == ref(text, add_special_tokens=False).input_ids
    for chat in chats(4):
        rendered = ref.apply_chat_template(chat["messages"], tokenize=False)
        assert tok.apply_chat_template(chat["messages"]) == rendered
        assert tok.encode(rendered) == ref(rendered, add_special_tokens=False).input_ids

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats(24)))
    dataset = tmp_path / "ds"
    assert (
        main(["prepare", "--data", str(data), "--tokenizer", str(ckpt), "--out", str(dataset)]) == 0
    )
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["kind"] == "finetune" and manifest["tokenizer"]["file"] == "tokenizer.json"
    assert manifest["splits"]["train"]["examples"] + manifest["splits"]["val"]["examples"] == 32

    train(
        TrainingArgs(
            data=str(dataset), out=str(tmp_path / "run"), init_from=str(ckpt), lora=True,
            lora_rank=4, batch_size=4, max_steps=6, learning_rate=1e-2, warmup_steps=0,
            eval_batches=1, progress=False,
        )
    )  # fmt: skip
    assert (tmp_path / "run" / "latest" / "tokenizer.json").is_file()
    assert main(["fuse", "--adapters", str(tmp_path / "run" / "latest"), "--out", str(fused)]) == 0
    assert load_tokenizer(fused).checksum == tok.checksum
    capsys.readouterr()

    generate = ["--prompt", PROMPT, "--chat", "--max-tokens", "24"]
    assert main(["generate", "--model", str(fused), *generate]) == 0
    mlx_text = capsys.readouterr().out
    assert main(["export", str(fused), str(onnx)]) == 0
    assert json.loads((onnx / "io.json").read_text())["deploy"]["tokenizer.json"].startswith(
        "copied"
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (onnx / name).read_bytes() == (ckpt / name).read_bytes()
    proc = subprocess.run(
        [sys.executable, "-c", NO_MLX, "onnx-generate", str(onnx), *generate],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == mlx_text
    assert mlx_text.strip()  # the comparison is of some text, not of two empty answers

    # The same ids through the Python APIs on both sides.
    from export.runtime import OnnxGenerator
    from mlx_transformer.checkpoint.mlx_io import load_checkpoint
    from mlx_transformer.generate.api import batch_generate

    mlx = batch_generate(load_checkpoint(fused), tok, [PROMPT], max_tokens=24, chat=True)
    gen = OnnxGenerator(onnx)
    ids = gen.encode(PROMPT, chat=True)
    chat = [{"role": "user", "content": PROMPT}]
    rendered = ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert ids == ref(rendered, add_special_tokens=False).input_ids
    assert gen.generate_tokens([ids], max_tokens=24)[0].tokens == mlx.token_ids[0]
    assert gen.generate(PROMPT, max_tokens=24, chat=True)[0].text == mlx.texts[0]
    assert mlx.texts[0] + "\n" == mlx_text, (mlx.texts, mlx_text)
    print(f"greedy answer ({len(mlx.token_ids[0])} tokens, equal on both sides): {mlx_text!r}")

    # onnxruntime-genai reads the export folder with the model's own tokenizer.json.
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return
    import onnxruntime_genai as og

    og_model = og.Model(str(onnx))
    og_tokenizer = og.Tokenizer(og_model)
    assert list(og_tokenizer.encode(rendered)) == ids
    params = og.GeneratorParams(og_model)
    params.set_search_options(do_sample=False, max_length=len(ids) + 24)
    generator = og.Generator(og_model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    og_ids = [int(t) for t in generator.get_sequence(0)[len(ids) :]]
    assert og_ids[: len(mlx.token_ids[0])] == mlx.token_ids[0]
    assert og_tokenizer.decode(og_ids) == tok.decode(og_ids)
