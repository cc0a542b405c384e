"""The package's shape, checked: which modules run without MLX, which commands re-execute for the
BLAS, and that the import graph between the stage folders has no cycle."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlx_transformer.cli import SUBCOMMANDS, WITHOUT_MLX

ROOT = Path(__file__).resolve().parents[1]
BLOCK_MLX = textwrap.dedent(
    """
    import sys
    class NoMLX:
        def find_spec(self, name, path=None, target=None):
            if name == "mlx" or name.startswith("mlx."):
                raise ImportError("mlx is blocked")
    sys.meta_path.insert(0, NoMLX())
    """
)


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.parametrize("command", sorted(WITHOUT_MLX))
def test_commands_without_mlx_neither_import_it_nor_reexecute(command):
    """`export`, `onnx-generate`, `info`, `prepare` (and `--help`) never touch MLX, so they must
    not pay for the BLAS probe and re-execution that MLX commands get."""
    code = BLOCK_MLX + textwrap.dedent(
        f"""
        from mlx_transformer.cpu import blas
        blas.ensure_fast_blas = lambda *a, **k: sys.exit("ensure_fast_blas was called")
        from mlx_transformer.cli import main
        try:
            main([{command!r}, "--help"])
        except SystemExit as e:
            assert e.code == 0, e.code
        main([])  # the command list, too
        """
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert command in proc.stdout


def test_mlx_commands_get_the_blas_preload():
    code = textwrap.dedent(
        """
        import sys
        from mlx_transformer.cpu import blas
        called = []
        blas.ensure_fast_blas = lambda *a, **k: called.append(1) or "skip"
        from mlx_transformer.cli import main
        try:
            main(["generate", "--help"])
        except SystemExit:
            pass
        assert called == [1], called
        """
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_without_mlx_names_real_commands():
    assert WITHOUT_MLX <= set(SUBCOMMANDS)
