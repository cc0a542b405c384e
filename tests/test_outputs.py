"""Output folders: every command that writes one (`export`, `convert --to-hf/--from-hf`, `fuse`,
`prepare`) writes a new or empty folder, replaces only a folder it wrote as the same kind (and only
with --overwrite), and refuses anything else in one line, touching nothing: a file, a user's
folder, another kind of output, a training run, a folder equal to, inside or holding an input.

Every case runs the real command line on a fresh copy of a small world and compares a fingerprint
(sha256 of every file, every folder and symlink) before and after.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from helpers import add_user_files, fingerprint

from mlx_transformer import atomic
from mlx_transformer.cli import main
from mlx_transformer.data.dataset import default_corpus_path, load_dataset

TINY_MODEL = [
    "--hidden-size", "32", "--num-hidden-layers", "1", "--num-attention-heads", "2",
    "--max-position-embeddings", "32", "--context-length", "32", "--batch-size", "4",
]  # fmt: skip
TRAIN = ["--max-steps", "2", "--save-every", "2", "--eval-every", "2", "--eval-batches", "1"]


def cli(world: Path, *argv: str) -> int:
    """The command line, run in `world`: its exit code."""
    cwd = os.getcwd()
    os.chdir(world)
    try:
        return main(list(argv))
    finally:
        os.chdir(cwd)


def run(world: Path, capsys, *argv: str) -> tuple[int, str]:
    """The command line, run in `world`: (exit code, stderr)."""
    capsys.readouterr()
    code = cli(world, *argv)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A text file, a dataset, a training run, a bare checkpoint CK (as written before the
    output marker: a run's checkpoint without its training state), an ONNX export, a Hugging Face
    folder, the checkpoint CK2 imported from it, LoRA adapters, and a user's things: a notes
    folder, a web app, a plain file, an empty folder."""
    world = tmp_path_factory.mktemp("world")
    text = default_corpus_path().read_text(encoding="utf-8")[:20_000]
    (world / "text.txt").write_text(text, encoding="utf-8")
    steps = [
        ["prepare", "--data", "text.txt", "--out", "DATA", "--model-type", "char"],
        ["train", "--data", "DATA", "--out", "RUN", *TRAIN, *TINY_MODEL, "--no-progress"],
    ]
    for argv in steps:
        assert cli(world, *argv) == 0, argv
    shutil.copytree((world / "RUN/latest").resolve(), world / "CK")
    shutil.rmtree(world / "CK/training_state")
    steps = [
        ["export", "CK", "EXP", "--no-measure"],
        ["convert", "--to-hf", "CK", "--out", "HF"],
        ["convert", "--from-hf", "HF", "--out", "CK2"],
        ["train", "--data", "DATA", "--out", "LORA", "--init-from", "CK", "--lora",
         "--lora-rank", "2", *TRAIN, "--context-length", "32", "--batch-size", "4",
         "--no-progress"],
    ]  # fmt: skip
    for argv in steps:
        assert cli(world, *argv) == 0, argv
    add_user_files(world)
    (world / "empty").mkdir()
    return world


@pytest.fixture
def world(pristine, tmp_path) -> Path:
    copy = tmp_path / "world"
    shutil.copytree(pristine, copy, symlinks=True)
    return copy


# -- refused: one line, exit 2, nothing touched ----------------------------------------------------

EXPORT = ["export", "CK"]
TO_HF = ["convert", "--to-hf", "CK", "--out"]
FROM_HF = ["convert", "--from-hf", "HF", "--out"]
FUSE = ["fuse", "--adapters", "LORA/latest", "--model", "CK", "--out"]
PREPARE = ["prepare", "--data", "text.txt", "--model-type", "char", "--out"]
NOT_OURS = r"is not empty and is not an? .* written by mlx-transformer \(it holds .*\); choose"

REFUSED = {
    # The reproductions: each replaced what was there.
    "export into a user's folder": (EXPORT + ["notes"], NOT_OURS),
    "export into a user's folder, --overwrite": (EXPORT + ["notes", "--overwrite"], NOT_OURS),
    "export a run's checkpoint over the run": (
        ["export", "RUN/latest", "RUN", "--overwrite"],
        r"the output RUN holds the input RUN/latest, which replacing it would delete",
    ),
    "export a checkpoint over itself": (
        EXPORT + ["CK", "--overwrite"],
        r"the output CK is the input CK; choose another",
    ),
    "export over a file": (EXPORT + ["file.txt", "--overwrite"], r"file.txt is not a folder"),
    "convert --to-hf into a user's folder": (TO_HF + ["notes", "--overwrite"], NOT_OURS),
    "fuse into a user's folder": (FUSE + ["notes", "--overwrite"], NOT_OURS),
    "prepare --overwrite over a web app's manifest.json": (
        PREPARE + ["webapp", "--overwrite"],
        r"webapp is not empty and is not a dataset written by mlx-transformer \(it holds "
        r"index.html, manifest.json\)",
    ),
    # Our own kind, without --overwrite.
    "export over an earlier export": (EXPORT + ["EXP"], r"EXP already holds an ONNX export; pass "),
    "convert --to-hf over an earlier one": (TO_HF + ["HF"], r"HF already holds a Hugging Face"),
    "convert --from-hf over a checkpoint": (FROM_HF + ["CK"], r"CK already holds a checkpoint; "),
    "fuse over a checkpoint": (FUSE + ["CK2"], r"CK2 already holds a checkpoint; pass "),
    "prepare over another dataset": (
        PREPARE + ["DATA", "--val-fraction", "0.2"],
        r"DATA holds a different dataset .*pass --overwrite",
    ),
    # Another kind, even with --overwrite.
    "export over a run's step checkpoint": (
        EXPORT + ["RUN/checkpoints/step_000002", "--overwrite"],
        r"step_000002 is not empty and is not an ONNX export",
    ),
    "export over a dataset": (
        EXPORT + ["DATA", "--overwrite"],
        r"DATA holds a dataset written by mlx-transformer, not an ONNX export",
    ),
    "export over a Hugging Face folder": (EXPORT + ["HF", "--overwrite"], r"holds a Hugging Face"),
    "export over the run's latest symlink": (
        EXPORT + ["RUN/latest", "--overwrite"],
        r"RUN/latest is a symbolic link",
    ),
    "convert --from-hf over an export": (
        FROM_HF + ["EXP", "--overwrite"],
        r"EXP holds an ONNX export written by mlx-transformer, not a checkpoint",
    ),
    "convert --from-hf over a run's best checkpoint": (
        FROM_HF + ["RUN/best", "--overwrite"],
        r"RUN/best holds a checkpoint with more in it \(training_state\)",
    ),
    "convert --to-hf over a checkpoint": (TO_HF + ["CK", "--overwrite"], r"the output CK is the"),
    "convert --to-hf over a run": (TO_HF + ["RUN", "--overwrite"], NOT_OURS),
    "fuse over the run": (FUSE + ["RUN", "--overwrite"], NOT_OURS),
    "prepare over an export": (
        PREPARE + ["EXP", "--overwrite"],
        r"EXP holds an ONNX export written by mlx-transformer, not a dataset",
    ),
    "prepare over a run": (PREPARE + ["RUN", "--overwrite"], NOT_OURS),
    "prepare over a file": (PREPARE + ["file.txt", "--overwrite"], r"file.txt is not a folder"),
    # Inputs.
    "convert --to-hf into its checkpoint": (
        TO_HF + ["CK/sub"],
        r"the output CK/sub is inside the input CK; choose a folder outside it",
    ),
    "convert --from-hf over its source": (FROM_HF + ["HF", "--overwrite"], r"the output HF is the"),
    "fuse over its adapters": (
        FUSE + ["LORA/latest", "--overwrite"],
        r"the output LORA/latest is the input LORA/latest",
    ),
    "fuse over its base": (FUSE + ["CK", "--overwrite"], r"the output CK is the input CK"),
    "fuse into the adapters' run": (
        FUSE + ["LORA", "--overwrite"],
        r"the output LORA holds the input LORA/latest",
    ),
    "prepare over the folder of its text": (
        ["prepare", "--data", "notes/todo.md", "--out", "notes", "--overwrite"],
        r"the output notes holds the input notes/todo.md",
    ),
    "prepare with its tokenizer inside the output": (
        [
            "prepare",
            "--data",
            "text.txt",
            "--tokenizer",
            "DATA/tokenizer.model",
            "--out",
            "DATA",
            "--val-fraction",
            "0.2",
            "--overwrite",
        ],
        r"the output DATA holds the input DATA/tokenizer.model",
    ),  # fmt: skip
}


@pytest.mark.parametrize("argv, message", REFUSED.values(), ids=REFUSED.keys())
def test_refused_output_is_one_line_and_touches_nothing(world, capsys, argv, message):
    before = fingerprint(world)
    code, err = run(world, capsys, *argv)
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"mlx-transformer {argv[0]}: error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert fingerprint(world) == before


def test_a_file_added_to_our_output_is_never_replaced(world, capsys):
    (world / "EXP/my-notes.txt").write_text("mine\n")
    before = fingerprint(world)
    code, err = run(world, capsys, *EXPORT, "EXP", "--overwrite", "--no-measure")
    assert code == 2 and err.count("\n") == 1, err
    assert "EXP holds an ONNX export with more in it (my-notes.txt)" in err
    assert fingerprint(world) == before


# -- written: a new path, an empty folder, our own kind with --overwrite ---------------------------


def check_export(folder: Path, flavour: str = "portable") -> None:
    from export.session import OnnxModel

    assert json.loads((folder / "io.json").read_text())["flavour"] == flavour
    OnnxModel(folder)


def check_checkpoint(folder: Path) -> None:
    from mlx_transformer.checkpoint.mlx_io import load_checkpoint

    load_checkpoint(folder)


def check_hf(folder: Path) -> None:
    from mlx_transformer.checkpoint.hf import import_hf

    import_hf(folder)


WRITERS = {
    "export": (EXPORT, ["--no-measure", "--flavour", "ort"], lambda f: check_export(f, "ort")),
    "convert --to-hf": (TO_HF, [], check_hf),
    "convert --from-hf": (FROM_HF, [], check_checkpoint),
    "fuse": (FUSE, [], check_checkpoint),
    "prepare": (PREPARE, ["--val-fraction", "0.2"], load_dataset),
}
OWN = {"export": "EXP", "convert --to-hf": "HF", "convert --from-hf": "CK2", "fuse": "CK2",
       "prepare": "DATA"}  # fmt: skip


@pytest.mark.parametrize("where", ["new/nested/folder", "empty"])
@pytest.mark.parametrize("command", WRITERS)
def test_writes_a_new_or_empty_folder_with_its_marker(world, capsys, command, where):
    head, tail, check = WRITERS[command]
    code, err = run(world, capsys, *head, where, *tail)
    assert code == 0, err
    check(world / where)
    marker = json.loads((world / where / atomic.MARKER).read_text())
    assert marker["kind"] in ("ONNX export", "Hugging Face model", "checkpoint", "dataset")
    leftovers = [p.name for p in (world / where).parent.iterdir() if ".tmp-" in p.name]
    assert not leftovers


@pytest.mark.parametrize("legacy", [False, True], ids=["marked", "written before the marker"])
@pytest.mark.parametrize("command", WRITERS)
def test_overwrite_replaces_our_own_kind(world, capsys, command, legacy):
    head, tail, check = WRITERS[command]
    own = world / OWN[command]
    if legacy:
        (own / atomic.MARKER).unlink(missing_ok=True)
    if command == "convert --to-hf" and legacy:
        # A Hugging Face folder has no schema of ours: without the marker it is not ours.
        code, err = run(world, capsys, *head, own.name, *tail, "--overwrite")
        assert code == 2 and "is not a Hugging Face model written by mlx-transformer" in err
        return
    stamp = {p.name: p.stat().st_mtime_ns for p in own.iterdir()}
    code, err = run(world, capsys, *head, own.name, *tail, "--overwrite")
    assert code == 0, err
    check(own)
    assert (own / atomic.MARKER).is_file()
    assert {p.name: p.stat().st_mtime_ns for p in own.iterdir()} != stamp
    assert not [p.name for p in world.iterdir() if p.name.startswith(f".{own.name}.")]


def test_export_into_the_run_folder_beside_its_checkpoint(world, capsys):
    code, err = run(world, capsys, "export", "RUN/latest", "RUN/onnx", "--no-measure")
    assert code == 0, err
    check_export(world / "RUN/onnx")


def test_library_default_refuses_too(world):
    from export import export_onnx
    from mlx_transformer.errors import UserError

    before = fingerprint(world)
    with pytest.raises(UserError, match="already holds an ONNX export"):
        export_onnx(world / "CK", world / "EXP", measure=False)
    assert fingerprint(world) == before
    export_onnx(world / "CK", world / "EXP", flavour="ort", measure=False, overwrite=True)
    check_export(world / "EXP", "ort")


def test_a_run_keeps_writing_its_own_checkpoints(tmp_path):
    """Without a kind (a run's own folders), write_folder replaces as before and adds no marker."""
    folder = tmp_path / "step"
    atomic.write_folder(folder, lambda tmp: (tmp / "a").write_text("1"))
    atomic.write_folder(folder, lambda tmp: (tmp / "b").write_text("2"))
    assert sorted(p.name for p in folder.iterdir()) == ["b"]
