"""A sweep over every subcommand with the inputs a careless or hostile user gives: missing, empty,
binary, truncated, lying headers, wrong types, absurd sizes, existing outputs.

Each case runs the real command in a fresh process on a fresh copy of a small world (a text
file, a prepared dataset, a training run with its checkpoint, an export, a user's notes folder,
a web app folder, a plain file) and asserts what every user error must give: exit code 2, one
line on stderr naming the command, no traceback, and every file that was there before unchanged
(sha256 of the whole world). Defect-specific tests live next to their code; this is the net.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import add_user_files, fingerprint

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "mlx_transformer/data/corpus/tinyshakespeare.txt"
TINY_MODEL = [
    "--hidden-size", "32", "--num-hidden-layers", "1", "--num-attention-heads", "2",
    "--max-position-embeddings", "32", "--context-length", "32", "--batch-size", "4",
]  # fmt: skip

pytestmark = pytest.mark.slow


def cli(*argv: str, cwd: Path, timeout: float = 120, stdin: bytes | None = None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUTF8": "0"}
    return subprocess.run(
        [sys.executable, "-m", "mlx_transformer", *argv],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """The world every case starts from, built with the real commands."""
    world = tmp_path_factory.mktemp("world")
    (world / "text.txt").write_text(CORPUS.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    steps = [
        ("prepare", "--data", "text.txt", "--out", "DATA", "--model-type", "char"),
        ("train", "--data", "DATA", "--out", "RUN", "--max-steps", "2", "--save-every", "2",
         "--eval-every", "2", "--eval-batches", "1", *TINY_MODEL),
        ("export", "RUN/latest", "EXP"),
    ]  # fmt: skip
    for argv in steps:
        proc = cli(*argv, cwd=world)
        assert proc.returncode == 0, (argv, proc.stderr.decode()[-2000:])
    add_user_files(world)
    (world / "binary.bin").write_bytes(bytes(range(256)) * 64)
    return world


# -- ways to spoil a copy of the world -------------------------------------------------------------


def ckpt(world: Path) -> Path:
    return (world / "RUN/latest").resolve()


def copy_ckpt(world: Path, name: str) -> Path:
    dst = world / name
    shutil.copytree(ckpt(world), dst, ignore=shutil.ignore_patterns("training_state"))
    return dst


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_safetensors(path: Path, header, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def nan_weights(world: Path) -> None:
    path = copy_ckpt(world, "CK_NAN") / "model.safetensors"
    header, data = safetensors_parts(path)
    name = next(k for k in header if k != "__metadata__" and header[k]["dtype"] == "F32")
    start = header[name]["data_offsets"][0]
    data = data[:start] + struct.pack("<f", float("nan")) + data[start + 4 :]
    write_safetensors(path, header, data)


def header_is_a_list(world: Path) -> None:
    path = copy_ckpt(world, "CK_BAD") / "model.safetensors"
    _, data = safetensors_parts(path)
    write_safetensors(path, [1, 2, 3], data)


def header_without_offsets(world: Path) -> None:
    path = copy_ckpt(world, "CK_BAD") / "model.safetensors"
    header, data = safetensors_parts(path)
    for key, value in header.items():
        if key != "__metadata__":
            value.pop("data_offsets")
    write_safetensors(path, header, data)


def overlapping_offsets(world: Path) -> None:
    path = copy_ckpt(world, "CK_BAD") / "model.safetensors"
    header, data = safetensors_parts(path)
    names = [k for k in header if k != "__metadata__"]
    a, b = sorted(names, key=lambda k: header[k]["data_offsets"])[:2]
    size_b = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    start_a = header[a]["data_offsets"][0]
    if header[a]["data_offsets"][1] - start_a >= size_b:  # b now lies inside a's bytes
        header[b]["data_offsets"] = [start_a, start_a + size_b]
    write_safetensors(path, header, data)


def config_edit(**changes) -> Callable[[Path], None]:
    def spoil(world: Path) -> None:
        path = copy_ckpt(world, "CK_BAD") / "config.json"
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config).replace("NaN", "Infinity"))

    return spoil


def config_is_a_directory(world: Path) -> None:
    folder = copy_ckpt(world, "CK_BAD")
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()


def manifest_is_a_list(world: Path) -> None:
    shutil.copytree(world / "DATA", world / "DATA_BAD")
    (world / "DATA_BAD/manifest.json").write_text("[1, 2]\n")


def io_json_is_a_list(world: Path) -> None:
    shutil.copytree(world / "EXP", world / "EXP_BAD")
    (world / "EXP_BAD/io.json").write_text("[]\n")


def io_json_without_keys(world: Path) -> None:
    shutil.copytree(world / "EXP", world / "EXP_BAD")
    (world / "EXP_BAD/io.json").write_text("{}\n")


def cut_state(name: str) -> Callable[[Path], None]:
    def spoil(world: Path) -> None:
        shutil.copytree(world / "RUN", world / "RUN_CUT", symlinks=True)
        matches = [p for p in (world / "RUN_CUT").rglob(name) if not p.is_symlink()]
        assert matches, name
        for path in matches:
            raw = path.read_bytes()
            path.write_bytes(raw[: len(raw) // 2])

    return spoil


def other_tokenizer_data(world: Path) -> None:
    text = CORPUS.read_text(encoding="utf-8")[30_000:40_000].upper()
    (world / "other.txt").write_text(text, encoding="utf-8")
    proc = cli("prepare", "--data", "other.txt", "--out", "DATA_OTHER", "--model-type", "char",
               cwd=world)  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()


def nothing(world: Path) -> None:
    pass


# (id, spoil, argv): every case must end in exit 2, one line, nothing changed.
CASES = [
    # outputs that hold something else
    ("export-into-notes", nothing, ["export", "RUN/latest", "notes"]),
    ("export-into-its-run", nothing, ["export", "RUN/latest", "RUN"]),
    ("export-onto-itself", nothing, ["export", "RUN/latest", "RUN/latest"]),
    ("export-onto-a-file", nothing, ["export", "RUN/latest", "file.txt"]),
    ("export-over-an-export", nothing, ["export", "RUN/latest", "EXP"]),
    ("convert-to-hf-into-notes", nothing, ["convert", "--to-hf", "RUN/latest", "--out", "notes"]),
    ("convert-from-notes", nothing, ["convert", "--from-hf", "notes", "--out", "NEW"]),
    ("prepare-over-a-web-app", nothing,
     ["prepare", "--data", "text.txt", "--out", "webapp", "--overwrite"]),
    ("prepare-over-notes", nothing, ["prepare", "--data", "text.txt", "--out", "notes"]),
    ("inspect-out-is-a-file", nothing,
     ["inspect", "--model", "RUN/latest", "--prompt", "ROMEO:", "--out", "file.txt"]),
    # absurd sizes and numbers
    ("prepare-vocab-1e11", nothing,
     ["prepare", "--data", "text.txt", "--out", "NEW", "--vocab-size", "100000000000"]),
    ("prepare-vocab-0", nothing, ["prepare", "--data", "text.txt", "--out", "NEW",
                                  "--vocab-size", "0"]),
    ("train-batch-1e9", nothing,
     ["train", "--data", "DATA", "--out", "NEW", "--max-steps", "1", *TINY_MODEL[:-2],
      "--batch-size", "1000000000"]),
    ("info-1e9-layers", config_edit(num_hidden_layers=10**9), ["info", "CK_BAD"]),
    ("generate-1e9-tokens", config_edit(max_position_embeddings=10**12),
     ["generate", "--model", "CK_BAD", "--prompt", "a", "--max-tokens", "1000000000"]),
    ("generate-repetition-context-1e12", nothing,
     ["generate", "--model", "RUN/latest", "--prompt", "a", "--repetition-penalty", "1.1",
      "--repetition-context-size", "1000000000000"]),
    ("onnx-generate-max-tokens-negative", nothing,
     ["onnx-generate", "EXP", "--prompt", "a", "--max-tokens", "-1"]),
    ("inspect-top-k-negative", nothing,
     ["inspect", "--model", "RUN/latest", "--prompt", "ROMEO:", "--out", "NEW", "--top-k", "-3"]),
    ("verify-tokens-negative", nothing, ["verify", "RUN/latest", "EXP", "--tokens", "-1"]),
    # lying or damaged files
    ("info-nan-weights", nan_weights, ["info", "CK_NAN"]),
    ("generate-nan-weights", nan_weights, ["generate", "--model", "CK_NAN", "--prompt", "a"]),
    ("info-header-is-a-list", header_is_a_list, ["info", "CK_BAD"]),
    ("generate-header-is-a-list", header_is_a_list, ["generate", "--model", "CK_BAD"]),
    ("export-header-is-a-list", header_is_a_list, ["export", "CK_BAD", "NEW"]),
    ("info-header-without-offsets", header_without_offsets, ["info", "CK_BAD"]),
    ("export-header-without-offsets", header_without_offsets, ["export", "CK_BAD", "NEW"]),
    ("info-overlapping-offsets", overlapping_offsets, ["info", "CK_BAD"]),
    ("generate-overlapping-offsets", overlapping_offsets, ["generate", "--model", "CK_BAD"]),
    ("export-overlapping-offsets", overlapping_offsets, ["export", "CK_BAD", "NEW"]),
    ("info-norm-eps-infinite", config_edit(norm_eps=float("nan")), ["info", "CK_BAD"]),
    ("generate-norm-eps-infinite", config_edit(norm_eps=float("nan")),
     ["generate", "--model", "CK_BAD", "--prompt", "a"]),
    ("info-config-is-a-directory", config_is_a_directory, ["info", "CK_BAD"]),
    ("train-manifest-is-a-list", manifest_is_a_list,
     ["train", "--data", "DATA_BAD", "--out", "NEW", "--max-steps", "1", *TINY_MODEL]),
    ("train-data-dev-zero", nothing,
     ["train", "--data", "/dev/zero", "--out", "NEW", "--max-steps", "1", *TINY_MODEL]),
    ("train-data-is-a-file", nothing,
     ["train", "--data", "file.txt", "--out", "NEW", "--max-steps", "1", *TINY_MODEL]),
    ("onnx-generate-io-is-a-list", io_json_is_a_list,
     ["onnx-generate", "EXP_BAD", "--prompt", "a"]),
    ("onnx-generate-io-without-keys", io_json_without_keys,
     ["onnx-generate", "EXP_BAD", "--prompt", "a"]),
    ("resume-cut-state-json", cut_state("state.json"),
     ["train", "--out", "RUN_CUT", "--resume", "--max-steps", "4"]),
    ("resume-cut-run-config", cut_state("run_config.json"),
     ["train", "--out", "RUN_CUT", "--resume", "--max-steps", "4"]),
    ("resume-cut-optimizer", cut_state("optimizer.safetensors"),
     ["train", "--out", "RUN_CUT", "--resume", "--max-steps", "4"]),
    ("init-from-with-another-tokenizer", other_tokenizer_data,
     ["train", "--init-from", "RUN/latest", "--data", "DATA_OTHER", "--out", "NEW",
      "--max-steps", "1"]),
    ("prepare-binary-input", nothing, ["prepare", "--data", "binary.bin", "--out", "NEW"]),
    ("prepare-missing-input", nothing, ["prepare", "--data", "nowhere.txt", "--out", "NEW"]),
    ("generate-missing-model", nothing, ["generate", "--model", "nowhere", "--prompt", "a"]),
    ("export-missing-model", nothing, ["export", "nowhere", "NEW"]),
    ("onnx-generate-not-an-export", nothing, ["onnx-generate", "notes", "--prompt", "a"]),
    ("verify-not-an-export", nothing, ["verify", "RUN/latest", "notes"]),
]  # fmt: skip


@pytest.mark.parametrize("spoil, argv", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_error_is_one_line_exit_2_and_nothing_changes(pristine, tmp_path, spoil, argv):
    world = tmp_path / "world"
    shutil.copytree(pristine, world, symlinks=True)
    spoil(world)
    before = fingerprint(world, folders=False)
    proc = cli(*argv, cwd=world)
    err = proc.stderr.decode(errors="replace").strip()
    assert "Traceback" not in err, err[-3000:]
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"mlx-transformer {argv[0]}: error: "), err
    assert fingerprint(world, folders=False) == before
    assert not (world / "NEW").exists()


# -- full and read-only disks, two writers ----------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 64 kB tmpfs inside the test's folder (root, where `mount` works), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount for a small tmpfs (a full or read-only disk)")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


DISK_CASES = [
    ("export", ["export", "RUN/latest", "{disk}/EXP"]),
    ("prepare", ["prepare", "--data", "text.txt", "--out", "{disk}/DATA", "--model-type", "char"]),
    ("convert", ["convert", "--to-hf", "RUN/latest", "--out", "{disk}/HF"]),
    ("train", ["train", "--data", "DATA", "--out", "{disk}/RUN", "--max-steps", "2",
               "--save-every", "1", *TINY_MODEL]),
]  # fmt: skip


@pytest.mark.parametrize("read_only", [False, True], ids=["full", "read-only"])
@pytest.mark.parametrize("argv", [c[1] for c in DISK_CASES], ids=[c[0] for c in DISK_CASES])
def test_a_full_or_read_only_disk_is_one_line_and_leaves_it_as_it_was(
    pristine, tmp_path, small_disk, argv, read_only
):
    world = tmp_path / "world"
    shutil.copytree(pristine, world, symlinks=True)
    (small_disk / "kept.txt").write_text("what was on the disk before\n")
    if read_only:
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    before = fingerprint(world, folders=False), fingerprint(small_disk, folders=False)
    argv = [a.format(disk=small_disk) for a in argv]
    proc = cli(*argv, cwd=world)
    err = proc.stderr.decode(errors="replace").strip()
    assert "Traceback" not in err, err[-3000:]
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert err.splitlines()[-1].startswith(f"mlx-transformer {argv[0]}: error: "), err
    assert len(err.splitlines()) == 1 or argv[0] == "train", err  # train's bar may come first
    assert (fingerprint(world, folders=False), fingerprint(small_disk, folders=False)) == before


def test_two_trainings_on_one_folder_the_second_is_refused(pristine, tmp_path):
    """Started together on one --out: one trains, the other is refused in one line; the run's
    metrics hold each step once."""
    world = tmp_path / "world"
    shutil.copytree(pristine, world, symlinks=True)
    argv = ["train", "--data", "DATA", "--out", "TWO", "--max-steps", "30", "--save-every", "10",
            "--eval-every", "0", "--log-every", "1", *TINY_MODEL]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "mlx_transformer", *argv],
            cwd=world,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read().decode()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2).strip()
    assert "Traceback" not in refused and len(refused.splitlines()) == 1, refused
    assert refused.startswith("mlx-transformer train: error: "), refused
    records = [json.loads(line) for line in (world / "TWO/metrics.jsonl").open()]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps and len(train_steps) == len(set(train_steps)), records
