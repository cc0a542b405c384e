"""What `mlx-transformer web` refuses (bad input, no npm or no registry): one line on stderr,
exit 2, nothing written or touched. The exports are made with test_web's helpers."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_model import random_model, tiny_config
from test_web import INSTALL, REPO, cli, export_random

# -- what `web` refuses, in one line, touching nothing ---------------------------------------------


def _tree(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _refused(done: subprocess.CompletedProcess, says: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlx-transformer web: error: "), lines
    assert says in lines[0], lines[0]


@pytest.mark.slow
def test_web_refuses_bad_input_in_one_line(tmp_path):
    from export.exporter import export_onnx
    from mlx_transformer.checkpoint.mlx_io import save_checkpoint

    no_tokenizer = tmp_path / "no-tokenizer"
    ckpt = save_checkpoint(tmp_path / "ckpt", random_model(tiny_config()))
    export_onnx(ckpt, no_tokenizer, measure=False)
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    cases = [
        ([str(tmp_path / "missing"), str(tmp_path / "out")], "io.json: not found"),
        ([str(no_tokenizer), str(tmp_path / "out")], "no tokenizer.model"),
        ([str(no_tokenizer), str(tmp_path / "out"), "--precision", "int4"], "not int4"),
        ([str(no_tokenizer), str(users)], "users"),
        ([str(no_tokenizer), str(no_tokenizer)], "no-tokenizer"),
    ]
    for args, says in cases:
        before = {p: _tree(p) for p in (tmp_path / "out", users, no_tokenizer)}
        _refused(cli("web", *args, check=False), says)
        assert {p: _tree(p) for p in before} == before
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_web_offline_is_one_line(tmp_path, tiny_tokenizer_path):
    """No npm cache and no registry, or no npm: one line that says so; nothing is written."""
    if shutil.which("npm") is None:
        pytest.skip(f"npm is not installed; {INSTALL}")
    onnx_dir = export_random(tmp_path, "gpt2", tiny_tokenizer_path)[1]
    env = {
        **os.environ,
        "MLX_TRANSFORMER_WEB_HOME": str(tmp_path / "cache"),
        "npm_config_registry": "http://127.0.0.1:9/",  # nothing listens: as offline
        "npm_config_fetch_retries": "0",
        "npm_config_cache": str(tmp_path / "npm-cache"),
    }
    out = tmp_path / "web"
    done = subprocess.run(
        [sys.executable, "-m", "mlx_transformer", "web", str(onnx_dir), str(out)],
        capture_output=True, text=True, cwd=REPO, env=env,
    )  # fmt: skip
    _refused(done, "could not install onnxruntime-web@")
    assert "offline" in done.stderr and not out.exists()
    done = subprocess.run(
        [sys.executable, "-m", "mlx_transformer", "web", str(onnx_dir), str(out)],
        capture_output=True, text=True, cwd=REPO, env={**env, "PATH": ""},
    )  # fmt: skip
    _refused(done, "npm is not installed")
    assert not out.exists()
