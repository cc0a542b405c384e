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
from helpers import BLOCK_MLX

from mlx_transformer.cli import SUBCOMMANDS, WITHOUT_MLX

ROOT = Path(__file__).resolve().parents[1]


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


# -- the import graph ---------------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def first_party_imports(path: Path) -> set[str]:
    """Every mlx_transformer / export module `path` imports, at module level or inside functions
    (an import inside a function is still a dependency)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            module = ".".join(base + [node.module or ""]).strip(".") if node.level else node.module
            targets = [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            if not target.startswith(("mlx_transformer", "export")):
                continue
            while target not in MODULES and "." in target:  # `from pkg import name`: pkg
                target = target.rpartition(".")[0]
            if target in MODULES and target != name:
                found.add(target)
    return found


FILES = sorted((ROOT / "mlx_transformer").rglob("*.py")) + sorted((ROOT / "export").glob("*.py"))
MODULES = {module_name(p) for p in FILES}
GRAPH = {module_name(p): first_party_imports(p) for p in FILES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def stage(module: str) -> str:
    """mlx_transformer.train.step -> mlx_transformer.train; root modules stand alone."""
    return ".".join(module.split(".")[:2])


def test_no_import_cycle_between_modules():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


def test_no_import_cycle_between_stage_folders():
    """Stages import downwards only: a folder never imports one that imports it back."""
    stages: dict[str, set[str]] = {}
    for module, deps in GRAPH.items():
        for dep in deps:
            if stage(dep) != stage(module) and stage(module) != "mlx_transformer":
                stages.setdefault(stage(module), set()).add(stage(dep))
    assert find_cycle(stages) is None, " -> ".join(find_cycle(stages))


def test_the_framework_free_list_names_real_modules():
    from mlx_transformer import FRAMEWORK_FREE

    assert set(FRAMEWORK_FREE) <= MODULES, set(FRAMEWORK_FREE) - MODULES


def test_framework_free_modules_and_export_import_only_framework_free_modules():
    """Statically, function-level imports included: export/ and the framework-free modules reach
    into mlx_transformer only through the FRAMEWORK_FREE list."""
    from mlx_transformer import FRAMEWORK_FREE

    for module, deps in GRAPH.items():
        if module in FRAMEWORK_FREE or module.startswith("export"):
            outside = {
                d for d in deps if d.startswith("mlx_transformer") and d not in FRAMEWORK_FREE
            }
            assert not outside, f"{module} imports {sorted(outside)}, which may import MLX"


def test_framework_free_modules_and_export_import_with_mlx_blocked():
    """And dynamically: every listed module and every export/ module imports where `import mlx`
    fails, and no MLX module is loaded afterwards."""
    from mlx_transformer import FRAMEWORK_FREE

    modules = list(FRAMEWORK_FREE) + sorted(m for m in MODULES if m.startswith("export"))
    code = BLOCK_MLX + textwrap.dedent(
        f"""
        import importlib
        for name in {modules!r}:
            importlib.import_module(name)
        assert not any(m == "mlx" or m.startswith("mlx.") for m in sys.modules)
        print("ok")
        """
    )
    proc = run_python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_the_package_root_holds_only_the_top_level_modules():
    """Everything else lives in a stage folder (see README "Where things live")."""
    root = {p.stem for p in (ROOT / "mlx_transformer").glob("*.py")}
    assert root == {
        "__init__", "__main__", "atomic", "cli", "config", "demo", "errors", "model", "ops",
        "tokenizer", "hf_tokenizers", "tokenizer_files", "chat", "rolling_cache", "local_attention",
        "verify",
    }  # fmt: skip
