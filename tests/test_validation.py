"""Hostile and careless inputs to the readers and generators, through the real command line:
each is refused before any work with one line on stderr and exit 2 (no traceback), leaving every
file as it was and writing nothing; or, where there is a right answer, it is given.

Covered here: KV caches larger than memory, io.json files that lie, onnx-generate's errors, bytes
that are not UTF-8 in a prompt, out-of-range flags. A checkpoint's own files that lie (configs,
safetensors headers, NaN weights, a tokenizer larger than the model) are in
test_validation_checkpoint, on these helpers and fixtures.
"""

from __future__ import annotations

import io
import json
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import fingerprint
from test_model import random_model, tiny_config

from export import export_onnx
from mlx_transformer.checkpoint.mlx_io import save_checkpoint
from mlx_transformer.cli import main
from mlx_transformer.errors import UserError
from mlx_transformer.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


# -- helpers ---------------------------------------------------------------------------------------


def refused(capsys, argv: list[str], match: str, watched: Path) -> str:
    """Run the command line; assert exit 2, one stderr line matching `match`, no traceback,
    nothing on stdout, and nothing under `watched` created, changed or removed."""
    before = fingerprint(watched)
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert err.startswith(f"mlx-transformer {argv[0]}: error: "), err
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    assert re.search(match, err), err
    assert out == "", out
    assert fingerprint(watched) == before
    return err


def run_cli(args: list, limit_gb: float | None = None) -> subprocess.CompletedProcess:
    """`python -m mlx_transformer ARGS` in a child, its address space capped at `limit_gb`."""

    def cap():
        limit = int(limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "mlx_transformer", *args],
        capture_output=True,
        cwd=ROOT,
        timeout=300,
        preexec_fn=cap if limit_gb else None,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, match: str) -> None:
    err = proc.stderr.decode()
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(match, err), err


def edit_json(path: Path, change) -> None:
    d = json.loads(path.read_text())
    d = change(d) or d
    path.write_text(json.dumps(d))


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_path) -> Tokenizer:
    return Tokenizer.load(tiny_tokenizer_path)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, tiny_tokenizer_path, tokenizer) -> Path:
    """A tiny GPT-2-style checkpoint (LayerNorm with biases, final norm) with a BPE tokenizer."""
    model = random_model(tiny_config(vocab_size=tokenizer.vocab_size))
    path = tmp_path_factory.mktemp("base") / "ckpt"
    return save_checkpoint(path, model, tokenizer_path=tiny_tokenizer_path)


@pytest.fixture(scope="module")
def base_onnx(tmp_path_factory, base_ckpt) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "onnx"
    export_onnx(base_ckpt, out)
    return out


@pytest.fixture
def ckpt(tmp_path, base_ckpt) -> Path:
    """A copy of the checkpoint for this test to damage."""
    return Path(shutil.copytree(base_ckpt, tmp_path / "ckpt"))


@pytest.fixture
def onnx_dir(tmp_path, base_onnx) -> Path:
    return Path(shutil.copytree(base_onnx, tmp_path / "onnx"))


def generate_argv(ckpt: Path, *flags: str) -> list[str]:
    return ["generate", "--model", str(ckpt), "--prompt", "hi", "--max-tokens", "2", *flags]


# -- KV cache memory -------------------------------------------------------------------------------


def test_generate_refuses_a_kv_cache_larger_than_memory_before_allocating(tmp_path, tokenizer):
    """A config claiming 2**27 positions (rotary: no table in the file) and --max-tokens 10**8:
    the cache would be 2 layers x 2 x 10**8 tokens x 4096 x 4 bytes = 6.6 TB. It is refused in
    one line before anything is allocated (capped at 4 GB, an allocation would fail)."""
    config = tiny_config(
        vocab_size=tokenizer.vocab_size,
        hidden_size=8,
        num_attention_heads=1,
        head_dim=4096,
        position_encoding="rope",
        max_position_embeddings=2**27,
    )
    ckpt = save_checkpoint(tmp_path / "ckpt", random_model(config), tokenizer.path)
    argv = ["generate", "--model", str(ckpt), "--prompt", "hi", "--max-tokens", str(10**8)]
    proc = run_cli(argv, limit_gb=4)
    assert_one_line_error(
        proc, r"the KV cache for 100,000,00\d tokens would need 6\.6 TB and .* is available"
    )


def test_onnx_generate_refuses_a_kv_cache_larger_than_memory(onnx_dir, capsys):
    def lie(io):
        io.update(context_length=2**30, head_dim=2**20)

    edit_json(onnx_dir / "io.json", lie)
    argv = ["onnx-generate", str(onnx_dir), "--prompt", "hi", "--max-tokens", str(10**9)]
    refused(capsys, argv, r"KV cache for 1,000,000,00\d tokens would need [\d,.]+ TB", onnx_dir)


# -- io.json ---------------------------------------------------------------------------------------


IO_FORGERIES = {
    "a list": (lambda io: [io], "a JSON list, not an object"),
    "no head_dim": (lambda io: io.pop("head_dim") and None, "head_dim is missing"),
    "layers as text": (
        lambda io: io.update(num_hidden_layers="2"),
        "num_hidden_layers is '2', not a positive integer",
    ),
    "context zero": (
        lambda io: io.update(context_length=0),
        "context_length is 0, not a positive integer",
    ),
    "layers true": (
        lambda io: io.update(num_hidden_layers=True),
        "num_hidden_layers is True, not a positive integer",
    ),
    "model outside the folder": (
        lambda io: io.update(model="../../model.onnx"),
        "model is '../../model.onnx', not a file name in the folder",
    ),
    "special tokens a list": (
        lambda io: io.update(special_tokens=[2]),
        "special_tokens is \\[2\\], not an object of token ids",
    ),
}


@pytest.mark.parametrize("forgery", list(IO_FORGERIES))
def test_io_json_that_lies_is_refused(onnx_dir, capsys, forgery):
    change, message = IO_FORGERIES[forgery]
    edit_json(onnx_dir / "io.json", change)
    argv = ["onnx-generate", str(onnx_dir), "--prompt", "hi", "--max-tokens", "2"]
    refused(capsys, argv, f"io.json: {message}; re-export the model", onnx_dir)


def test_io_json_that_is_a_folder_or_not_json(onnx_dir, capsys):
    argv = ["onnx-generate", str(onnx_dir), "--prompt", "hi"]
    (onnx_dir / "io.json").write_text("[" * 100_000)
    refused(capsys, argv, "nested too deeply", onnx_dir)
    (onnx_dir / "io.json").unlink()
    (onnx_dir / "io.json").mkdir()
    refused(capsys, argv, "io.json: cannot be read", onnx_dir)


# -- onnx-generate: errors come first and alone ----------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-tokens", "-1"], "--max-tokens must be a non-negative integer, got -1"),
        (["--max-tokens", "500"], "--overflow slide"),
        (["--top-k", "-3"], "top-k"),
        (["--repetition-penalty", "0"], "repetition penalty must be a positive number"),
        (["--repetition-context-size", "0"], "repetition context size must be a positive"),
        (["--provider", "nonesuch"], "execution provider 'nonesuch' is not available"),
    ],
)
def test_onnx_generate_errors_come_first_and_alone(base_onnx, capsys, flags, message):
    """No provider banner, no echoed prompt: the error line is all there is."""
    argv = ["onnx-generate", str(base_onnx), "--prompt", "hi", *flags]
    refused(capsys, argv, message, base_onnx)


def test_onnx_generate_banner_still_comes_on_success(base_onnx, capsys):
    assert main(["onnx-generate", str(base_onnx), "--prompt", "hi", "--max-tokens", "3"]) == 0
    assert capsys.readouterr().err == "[CPUExecutionProvider: full]\n"


# -- prompts that are not UTF-8 --------------------------------------------------------------------

PROMPT_BYTES = b"The \xff\xfeking\xe2\x82"  # two bad bytes, then a cut-off character
ESCAPED = PROMPT_BYTES.decode("utf-8", "surrogateescape")  # what Python makes of such argv


def test_invalid_utf8_is_encoded_as_its_own_bytes(tokenizer):
    """The text around the bad bytes is encoded as usual; each byte becomes its byte piece."""

    def byte(b: int) -> int:
        return tokenizer.piece_to_id(f"<0x{b:02X}>")

    want = tokenizer.encode("The ") + [byte(0xFF), byte(0xFE)]
    want += tokenizer.encode("king") + [byte(0xE2), byte(0x82)]
    assert tokenizer.encode(ESCAPED) == want
    with pytest.raises(UserError, match="lone surrogate U\\+D800 at character 2"):
        tokenizer.encode("ab\ud800")  # not a byte: Python never escapes to it


@pytest.mark.parametrize("source", ["argv", "stdin"])
def test_invalid_utf8_prompt_generates_alike_in_mlx_and_onnx(
    base_ckpt, base_onnx, capsys, monkeypatch, source
):
    def prompt_arg() -> str:
        if source == "argv":
            return ESCAPED
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(PROMPT_BYTES)))
        return "-"

    flags = ["--max-tokens", "12"]
    assert main(["generate", "--model", str(base_ckpt), "--prompt", prompt_arg(), *flags]) == 0
    mlx_out = capsys.readouterr().out
    assert main(["onnx-generate", str(base_onnx), "--prompt", prompt_arg(), *flags]) == 0
    onnx_out = capsys.readouterr().out
    assert onnx_out == PROMPT_BYTES.decode("utf-8", "replace") + mlx_out


def test_invalid_utf8_in_real_argv_bytes(base_onnx):
    proc = run_cli(["onnx-generate", str(base_onnx), "--prompt", PROMPT_BYTES, "--max-tokens", "3"])
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().startswith("The \ufffd\ufffdking\ufffd")


def test_invalid_utf8_without_byte_fallback_is_refused_with_the_byte_offset(
    tmp_path, capsys, tiny_corpus_text
):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus_text.splitlines()),
        model_writer=model,
        model_type="char",
        byte_fallback=False,
        minloglevel=2,
    )
    (tmp_path / "tok.model").write_bytes(model.getvalue())
    vocab = Tokenizer(model.getvalue()).vocab_size
    ckpt = save_checkpoint(
        tmp_path / "ckpt", random_model(tiny_config(vocab_size=vocab)), tmp_path / "tok.model"
    )
    refused(
        capsys,
        ["generate", "--model", str(ckpt), "--prompt", ESCAPED, "--max-tokens", "2"],
        r"not valid UTF-8: byte 0xFF at byte offset 4, and this tokenizer has no byte fallback",
        tmp_path,
    )


# -- flags -----------------------------------------------------------------------------------------


def test_a_repetition_window_past_the_history_is_the_whole_history(base_ckpt, base_onnx, capsys):
    """--repetition-context-size 10**12 used to be a traceback (MLX slices take int32)."""
    outputs = []
    for size in ("1000", str(10**12)):
        flags = ["--prompt", "The king", "--max-tokens", "12", "--repetition-penalty", "1.5"]
        flags += ["--repetition-context-size", size]
        assert main(["generate", "--model", str(base_ckpt), *flags]) == 0
        outputs.append(capsys.readouterr().out)
        assert main(["onnx-generate", str(base_onnx), *flags]) == 0
        outputs.append(capsys.readouterr().out.removeprefix("The king"))
    assert len(set(outputs)) == 1, outputs


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--repetition-context-size", "0"], "repetition context size must be a positive"),
        (["--repetition-penalty", "nan"], "repetition penalty must be a positive number"),
        (["--max-tokens", "-1"], "--max-tokens must be a non-negative integer"),
        (["--prefill-step-size", "0"], "--prefill-step-size must be >= 1"),
    ],
)
def test_generate_flags_are_checked_before_loading(tmp_path, capsys, flags, message):
    """The settings are checked before the checkpoint is even looked at."""
    argv = ["generate", "--model", str(tmp_path / "none"), "--prompt", "hi", *flags]
    refused(capsys, argv, message, tmp_path)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top-k", "-3"], "--top-k must be a positive integer, got -3"),
        (["--top-k", "0"], "--top-k must be a positive integer, got 0"),
        (["--ablate", "9.0"], "--ablate '9.0': the model has 2 layers of 4 heads"),
    ],
)
def test_inspect_refuses_bad_flags_writing_nothing(ckpt, capsys, flags, message):
    out = ckpt.parent / "inspect"
    argv = ["inspect", "--model", str(ckpt), "--prompt", "The king", "--out", str(out), *flags]
    refused(capsys, argv, message, ckpt.parent)
    assert not out.exists()


def test_inspect_out_that_is_a_file_is_refused_and_kept(ckpt, capsys):
    notes = ckpt.parent / "notes.txt"
    notes.write_text("mine")
    argv = ["inspect", "--model", str(ckpt), "--prompt", "The king", "--out", str(notes)]
    refused(capsys, argv, "exists and is not a folder", ckpt.parent)
    assert notes.read_text() == "mine"


def test_convert_from_a_hugging_face_folder_whose_config_is_a_folder(tmp_path, capsys):
    hf = tmp_path / "hf"
    (hf / "config.json").mkdir(parents=True)
    argv = ["convert", "--from-hf", str(hf), "--out", str(tmp_path / "out")]
    refused(capsys, argv, "config.json: cannot be read", tmp_path)
