"""The checkpoint folder: exact round trips, strict loading, one-line errors, atomic writes."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_model import CONFIGS, random_model, tiny_config

from mlx_transformer import atomic
from mlx_transformer.checkpoint.format import CheckpointError
from mlx_transformer.checkpoint.mlx_io import load_checkpoint, save_checkpoint
from mlx_transformer.cli import main as cli_main


@pytest.fixture
def saved(tmp_path):
    model = random_model(tiny_config(**CONFIGS["llama-gqa"]))
    return save_checkpoint(tmp_path / "ckpt", model), model


def flat(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_exact(name, tmp_path):
    model = random_model(tiny_config(**CONFIGS[name]))
    loaded = load_checkpoint(save_checkpoint(tmp_path / "c", model))
    assert loaded.config == model.config
    a, b = flat(model), flat(loaded)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    ids = mx.array([[5, 3, 8, 1]])
    assert np.array_equal(np.array(model(ids)), np.array(loaded(ids)))


def test_bfloat16_round_trip(tmp_path):
    model = random_model(tiny_config())
    loaded = load_checkpoint(save_checkpoint(tmp_path / "c", model, dtype="bfloat16"))
    for k, v in tree_flatten(loaded.parameters()):
        assert v.dtype == mx.bfloat16
        ref = dict(tree_flatten(model.parameters()))[k].astype(mx.bfloat16)
        assert mx.array_equal(v, ref)


def rewrite_weights(folder, change):
    weights = mx.load(str(folder / "model.safetensors"))
    change(weights)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)


BROKEN = {
    "missing": (
        lambda w: w.pop("layers.1.mlp.up_proj.weight"),
        "missing tensor layers.1.mlp.up_proj.weight",
    ),
    "extra": (
        lambda w: w.update({"layers.9.attn.q_proj.weight": mx.zeros((2, 2))}),
        "unexpected tensor layers.9.attn.q_proj.weight",
    ),
    "misshaped": (
        lambda w: w.update({"norm.weight": mx.zeros((31,))}),
        r"tensor norm.weight has shape \(31,\), the config expects \(32,\)",
    ),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_strict_loading_names_the_tensor(saved, kind):
    folder, _ = saved
    change, message = BROKEN[kind]
    rewrite_weights(folder, change)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(folder)


def test_truncated_weights_file(saved):
    folder, _ = saved
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(folder)


def test_weights_that_overflow_the_requested_dtype_are_refused(saved):
    folder, _ = saved
    rewrite_weights(folder, lambda w: w.update({"norm.weight": mx.full((32,), 1e30)}))
    with pytest.raises(
        CheckpointError, match="tensor norm.weight holds NaN or infinity as float16"
    ):
        load_checkpoint(folder, dtype="float16")
    assert np.array(load_checkpoint(folder).norm.weight).max() == np.float32(1e30)


def test_finite_weights_whose_sum_overflows_still_load(saved):
    """The load-time check sums each tensor; an overflowing sum is confirmed element-wise."""
    folder, _ = saved
    rewrite_weights(folder, lambda w: w.update({"norm.weight": mx.full((32,), 3e38)}))
    assert np.array(load_checkpoint(folder).norm.weight).min() == np.float32(3e38)
    rewrite_weights(folder, lambda w: w["norm.weight"].__setitem__(5, float("nan")))
    with pytest.raises(CheckpointError, match="tensor norm.weight contains NaN or infinity"):
        load_checkpoint(folder)


def test_the_framing_check_reads_any_safetensors_dtype(tmp_path):
    """Training state holds integers: the same check of offsets serves it when asked to."""
    from mlx_transformer.checkpoint.format import read_safetensors_header

    path = tmp_path / "state.safetensors"
    mx.save_safetensors(str(path), {"step": mx.array([7], mx.uint32), "m": mx.zeros((2, 3))})
    header = read_safetensors_header(path, dtypes=("U32", "F32"))
    assert header["step"]["dtype"] == "U32" and header["m"]["shape"] == [2, 3]
    with pytest.raises(CheckpointError, match="tensor step has unsupported dtype U32"):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ('{"hidden_size": "wide"}', "hidden_size must be a positive integer"),
        ('{"norm_type": "batchnorm"}', "norm_type must be one of layernorm, rmsnorm"),
        ('{"model_type": "gpt2"}', "import Hugging Face checkpoints"),
    ],
)
def test_invalid_config_json(saved, text, message):
    folder, _ = saved
    (folder / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(folder)


def test_cli_reports_one_line_without_traceback(saved, tmp_path):
    folder, _ = saved
    (folder / "config.json").write_text('{"num_attention_heads": 0}')
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_transformer", "info", str(folder)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "num_attention_heads must be a positive integer" in proc.stderr
    assert cli_main(["info", str(tmp_path / "nowhere")]) == 2


def test_info_describes_a_valid_checkpoint(saved, capsys):
    folder, model = saved
    assert cli_main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"{model.config.num_parameters() / 1e6:.3f} M parameters (F32)" in out


def test_failed_save_leaves_the_previous_checkpoint(saved):
    folder, model = saved
    before = (folder / "model.safetensors").read_bytes()

    def crash(tmp):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(folder, random_model(model.config, seed=1), write_extra=crash)
    assert (folder / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["ckpt"]  # no temp debris
    assert json.loads((folder / "config.json").read_text())["format_version"] == 1


def test_atomic_writes_leave_no_temporaries(tmp_path):
    atomic.write_text(tmp_path / "a.json", "old")
    atomic.write_text(tmp_path / "a.json", "new")
    atomic.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic.replace_symlink(tmp_path / "latest", "a.json")
    atomic.replace_symlink(tmp_path / "latest", "b.bin")
    assert (tmp_path / "a.json").read_text() == "new"
    assert (tmp_path / "latest").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "latest"]


def test_folder_left_by_a_killed_writer_is_cleaned_up_or_restored(tmp_path):
    exited = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(exited.stdout)  # a process that is gone
    # Killed between its two renames: the previous folder set aside, the new one unfinished.
    old, tmp = tmp_path / f".out.old-{pid}", tmp_path / f".out.tmp-{pid}"
    old.mkdir()
    (old / "x").write_text("previous")
    tmp.mkdir()
    atomic.remove_stale_temporaries(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "x").read_text() == "previous"
    atomic.write_folder(tmp_path / "out", lambda tmp: (tmp / "y").write_text("new"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
