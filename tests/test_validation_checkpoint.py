"""A checkpoint's files that lie, through the real command line: configs claiming absurd sizes or
non-finite floats, config.json that is a folder or not JSON, forged safetensors headers, NaN and
infinite weights, a tokenizer larger than the model. Each reader refuses them before any work
with one line on stderr and exit 2, leaving every file as it was (test_validation's helpers and
fixtures)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import test_validation
from helpers import fingerprint
from test_model import random_model, tiny_config
from test_validation import assert_one_line_error, edit_json, generate_argv, refused, run_cli

from mlx_transformer.checkpoint.format import find_non_finite, read_safetensors_header
from mlx_transformer.checkpoint.mlx_io import save_checkpoint
from mlx_transformer.errors import UserError

# test_validation's fixtures: a tiny checkpoint (module-wide) and a copy of it for each test.
tokenizer, base_ckpt, ckpt = (
    test_validation.tokenizer,
    test_validation.base_ckpt,
    test_validation.ckpt,
)

# Each reader of a checkpoint: the MLX loader (generate), the numpy one (export), and info.
READERS = {
    "info": lambda ckpt: ["info", str(ckpt)],
    "generate": lambda ckpt: generate_argv(ckpt),
    "export": lambda ckpt: ["export", str(ckpt), str(ckpt.parent / "exported")],
}


def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_st(path: Path, header, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


# -- config.json: bounded sizes, finite floats, a file --------------------------------------------


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_hidden_layers", 16_385, "num_hidden_layers must be at most 16,384"),
        ("max_position_embeddings", 10**12, "max_position_embeddings must be at most"),
        ("vocab_size", 2**40, "vocab_size must be at most"),
        ("norm_eps", float("inf"), "norm_eps must be a positive finite number, got inf"),
        ("norm_eps", float("nan"), "norm_eps must be a positive finite number, got nan"),
        ("norm_eps", 0.0, "norm_eps must be a positive finite number, got 0.0"),
        ("norm_eps", -1e-5, "norm_eps must be a positive finite number"),
        ("rope_theta", float("inf"), "rope_theta must be a positive finite number"),
        ("initializer_range", float("nan"), "initializer_range must be a positive finite"),
        ("attention_dropout", float("nan"), "attention_dropout must be a number in"),
        ("extra", [1, 2], "extra must be a JSON object"),
    ],
)
def test_config_values_are_bounded_and_finite(ckpt, capsys, reader, field, value, message):
    edit_json(ckpt / "config.json", lambda d: d.update({field: value}))
    refused(capsys, READERS[reader](ckpt), f"config.json: {message}", ckpt.parent)


def test_info_on_a_700_byte_config_claiming_a_billion_layers_stays_small(ckpt):
    """It used to build every layer's tensor table first: past 3 GB. Capped at 2 GB of address
    space, the child is refused in one line."""
    edit_json(ckpt / "config.json", lambda d: d.update(num_hidden_layers=10**9))
    assert (ckpt / "config.json").stat().st_size < 1000
    assert_one_line_error(run_cli(["info", str(ckpt)], limit_gb=2), "at most 16,384")


def test_checking_tensors_stops_at_the_first_one_the_file_lacks(ckpt, capsys):
    """A config claiming many more layers than the file holds is refused after listing what the
    file has, not every layer the config claims."""
    edit_json(ckpt / "config.json", lambda d: d.update(num_hidden_layers=16_384))
    refused(
        capsys,
        ["info", str(ckpt)],
        r"missing tensor layers\.2\.attn_norm\.weight required by the config, which describes "
        r"262,148 tensors \(36 found\)",
        ckpt.parent,
    )


@pytest.mark.parametrize("reader", list(READERS))
def test_config_json_that_is_a_folder(ckpt, capsys, reader):
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").mkdir()
    refused(capsys, READERS[reader](ckpt), "config.json: a folder, not a JSON file", ckpt.parent)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[" * 100_000, "nested too deeply"),
        ('{"vocab_size": ' + "9" * 5000 + "}", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
    ],
)
def test_config_json_that_is_not_json(ckpt, capsys, text, message):
    path = ckpt / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    refused(capsys, ["info", str(ckpt)], message, ckpt.parent)


# -- safetensors: forged headers -------------------------------------------------------------------


def _overlap(header, data):
    """norm.bias made to read norm.weight's bytes, its own cut out: one overlap and no gap."""
    begin, end = header["norm.bias"]["data_offsets"]
    for t in header.values():
        if isinstance(t, dict) and "data_offsets" in t and t["data_offsets"][0] >= end:
            t["data_offsets"] = [o - (end - begin) for o in t["data_offsets"]]
    header["norm.bias"]["data_offsets"] = header["norm.weight"]["data_offsets"]
    return header, data[:begin] + data[end:]


def _short_span(header, data):
    begin = header["norm.bias"]["data_offsets"][0]
    header["norm.bias"]["data_offsets"] = [begin, begin + 4]
    return header, data


FORGERIES = {
    "header is a list": (
        lambda h, d: ([{"name": k, **v} for k, v in h.items() if k != "__metadata__"], d),
        r"corrupt safetensors header \(a JSON list, not an object\)",
    ),
    "entry lacks data_offsets": (
        lambda h, d: (h["norm.weight"].pop("data_offsets"), (h, d))[1],
        r"tensor norm\.weight has no valid data_offsets \(None\)",
    ),
    "offsets are strings": (
        lambda h, d: (h["norm.weight"].update(data_offsets=["0", "128"]), (h, d))[1],
        r"tensor norm\.weight has no valid data_offsets",
    ),
    "entry is a number": (
        lambda h, d: (h.update({"norm.weight": 7}), (h, d))[1],
        r"tensor norm\.weight is not a JSON object",
    ),
    "negative shape": (
        lambda h, d: (h["norm.weight"].update(shape=[-32]), (h, d))[1],
        r"tensor norm\.weight has no valid shape",
    ),
    "two tensors share bytes": (_overlap, r"tensor norm\.\w+ overlaps the tensor before it"),
    "span shorter than the shape": (_short_span, r"its shape \[32\] and dtype F32 need 128"),
    "bytes after the last tensor": (
        lambda h, d: (h, d + b"\0" * 16),
        "16 bytes after the last tensor",
    ),
    "unknown dtype": (
        lambda h, d: (h["norm.weight"].update(dtype="Q7"), (h, d))[1],
        r"tensor norm\.weight has no valid dtype \('Q7'\)",
    ),
}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_forged_safetensors_headers_are_refused_by_every_reader(ckpt, capsys, reader, forgery):
    path = ckpt / "model.safetensors"
    forge, message = FORGERIES[forgery]
    write_st(path, *forge(*read_st(path)))
    refused(capsys, READERS[reader](ckpt), message, ckpt.parent)


def test_overlapping_offsets_of_a_file_safetensors_itself_wrote(tmp_path):
    """The reader follows the format's rule (tensors tile the data, no gap, no overlap), which
    every file the safetensors library writes meets."""
    from safetensors.numpy import save_file

    save_file({"a": np.ones((3, 2), np.float32), "b": np.zeros(5, np.float16)}, tmp_path / "x")
    header = read_safetensors_header(tmp_path / "x", dtypes=("F32", "F16"))
    assert {k: v["shape"] for k, v in header.items()} == {"a": [3, 2], "b": [5]}
    h, d = read_st(tmp_path / "x")
    h["b"]["data_offsets"] = [0, 10]  # inside a's bytes
    write_st(tmp_path / "x", h, d)
    with pytest.raises(UserError, match="tensor a overlaps the tensor before it"):
        read_safetensors_header(tmp_path / "x", dtypes=("F32", "F16"))


# -- weights: NaN and infinity ---------------------------------------------------------------------


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_non_finite_weights_are_refused_naming_the_tensor(ckpt, capsys, reader, bad, dtype):
    path = ckpt / "model.safetensors"
    weights = {k: v.astype(dtype) for k, v in mx.load(str(path)).items()}
    w = np.array(weights["layers.1.mlp.up_proj.weight"].astype(mx.float32))
    w[3, 5] = bad
    weights["layers.1.mlp.up_proj.weight"] = mx.array(w).astype(dtype)
    mx.save_safetensors(str(path), weights)
    refused(
        capsys,
        READERS[reader](ckpt),
        r"tensor layers\.1\.mlp\.up_proj\.weight contains NaN or infinity",
        ckpt.parent,
    )


def test_the_bit_test_finds_exactly_the_non_finite_values(tmp_path):
    """Largest finite values pass, every NaN and infinity is caught, in each float dtype."""
    cases = {
        mx.float32: [3.4028235e38, -3.4028235e38, 1e-45],
        mx.float16: [65504.0, -65504.0, 6e-8],
        mx.bfloat16: [3.38e38, -3.38e38, 1e-40],
    }
    for dtype, finite in cases.items():
        for bad in (None, float("nan"), float("inf"), -float("inf")):
            values = finite + ([bad] if bad is not None else [])
            path = tmp_path / "w.safetensors"
            mx.save_safetensors(str(path), {"ok": mx.ones(7), "t": mx.array(values).astype(dtype)})
            header = read_safetensors_header(path)
            assert find_non_finite(path, header) == (None if bad is None else "t")


# -- the tokenizer must fit the model --------------------------------------------------------------


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path, tiny_tokenizer_path):
    """Its ids would index past the embedding table: MLX does not check (garbage, or SIGSEGV
    for a large id), and generate used to run."""
    model = random_model(tiny_config(vocab_size=61))  # the tokenizer has 400 ids
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer_path=tiny_tokenizer_path)
    before = fingerprint(tmp_path)
    message = r"has 400 ids but the model only 61 embeddings"
    for argv in (
        ["generate", "--model", str(ckpt), "--prompt", "The king", "--max-tokens", "2"],
        ["inspect", "--model", str(ckpt), "--prompt", "The king", "--out", str(tmp_path / "i")],
        ["info", str(ckpt)],
    ):
        assert_one_line_error(run_cli(argv), message)
    assert fingerprint(tmp_path) == before
