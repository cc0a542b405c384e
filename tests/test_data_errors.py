"""Data pipeline errors: bad input to `prepare` and to the readers of a dataset is one line that
names the place and what to do, and a full or read-only disk leaves the previous dataset whole."""

import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from helpers import fingerprint

from mlx_transformer.cli import main
from mlx_transformer.data.dataset import load_dataset
from mlx_transformer.data.prepare import prepare
from mlx_transformer.errors import UserError

# --- bad input: one line that names the place and what to do ------------------------------


def write(path, data):
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: [write(d / "empty.txt", "")], r"corpus is empty"),
        (lambda d: [(d / "folder").mkdir() or d / "folder"], r"folder .*folder holds no text"),
        (lambda d: [d / "missing.txt"], r"missing.txt does not exist"),
        (
            lambda d: [write(d / "a.txt", "ok\n" * 10), write(d / "b.txt", b"line\nbad\xe2\x28\n")],
            r"b\.txt: invalid UTF-8 at byte 8 \(line 2\).*--replace-invalid-utf8",
        ),
        (
            lambda d: [write(d / "x.jsonl", '{"text": "a"}\n\n{"text": oops}\n')],
            r"x\.jsonl:3: not valid JSON",
        ),
        (
            lambda d: [write(d / "x.jsonl", '{"text": "a"}\n{"prompt": "p"}\n')],
            r"x\.jsonl:2: expected a JSON object with a string \"text\" field",
        ),
        (
            lambda d: [write(d / "x.jsonl", '{"text": "a"}\n{"prompt": "p", "completion": "c"}\n')],
            r"x\.jsonl:2: finetune data mixed with pretrain data",
        ),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, tok, make, message):
    data = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UserError, match=message) as e:
        prepare(data, tmp_path / "ds", tokenizer=tok.path)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no ds, no temp folder


def test_vocab_size_too_large_for_corpus(tmp_path, corpus_file):
    with pytest.raises(UserError, match=r"vocabulary size 20000 is too large .*--vocab-size \d+"):
        prepare([corpus_file], tmp_path / "ds", vocab_size=20000)
    assert not (tmp_path / "ds").exists()


def test_out_folder_that_is_not_a_dataset(tmp_path, corpus_file, tok):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not a dataset written by mlx-transformer"):
        prepare([corpus_file], tmp_path / "mine", tokenizer=tok.path, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_damaged_dataset(tmp_path, corpus_file, tok):
    prepare([corpus_file], tmp_path / "ds", tokenizer=tok.path)
    with open(tmp_path / "ds" / "val_000.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(UserError, match="val_000.bin holds .* bytes, the manifest says"):
        load_dataset(tmp_path / "ds")
    with pytest.raises(UserError, match="no dataset at"):
        load_dataset(tmp_path / "nothing")


def test_cli_prepare(tmp_path, corpus_file, tok, capsys):
    out = tmp_path / "ds"
    argv = ["prepare", "--data", str(corpus_file), "--out", str(out), "--tokenizer", str(tok.path)]
    assert main(argv + ["--workers", "1"]) == 0
    assert load_dataset(out).splits["train"].tokens > 0
    assert main(argv + ["--val-fraction", "0.3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mlx-transformer prepare: error: ") and "--overwrite" in err
    bad = write(tmp_path / "bad.txt", b"\xff")
    assert main(["prepare", "--data", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"mlx-transformer prepare: error: {bad}: invalid UTF-8 at byte 0 (line 1); fix the file "
        "or pass --replace-invalid-utf8 to read bad bytes as U+FFFD"
    )


def one_error_line(err: str, command: str = "prepare") -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"mlx-transformer {command}: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "vocab_size, extra, message",
    [
        (0, [], r"--vocab-size 0 is too small: every vocabulary holds 261 pieces"),
        (-5, [], r"--vocab-size -5 is too small"),
        (261, ["--special-tokens", "<a>"], r"--vocab-size 261 is too small: .* holds 262 pieces"),
        (260, ["--model-type", "char"], r"--vocab-size 260 is too small"),
        (100_000_000_000, [], r"--vocab-size 100000000000 is too large: the limit is 1,048,576"),
        (2**31, ["--model-type", "unigram"], r"too large: the limit is 1,048,576"),
    ],
)
def test_vocab_size_sentencepiece_cannot_train_is_refused_first(
    tmp_path, corpus_file, capsys, vocab_size, extra, message
):
    """Refused before sentencepiece runs: no "INTERNAL: src/trainer_interface.cc" text, no
    traceback (10**11 overflowed its int32), no progress bar glued to the line."""
    before = fingerprint(tmp_path)
    argv = ["prepare", "--data", str(corpus_file), "--out", str(tmp_path / "ds")]
    assert main([*argv, "--vocab-size", str(vocab_size), *extra]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert re.search(message, line) and "INTERNAL" not in line and "src/" not in line, line
    assert fingerprint(tmp_path) == before


def screen_lines(raw: bytes) -> list[str]:
    """What a terminal shows for `raw`: a carriage return moves back to the line's start."""
    shown = []
    for line in raw.decode("utf-8", "replace").replace("\r\n", "\n").split("\n"):
        cells: list[str] = []
        col = 0
        for ch in line:
            if ch == "\r":
                col = 0
                continue
            cells[col : col + 1] = [ch]
            col += 1
        shown.append("".join(cells).rstrip())
    return [line for line in shown if line]


def run_on_a_terminal(argv: list[str], cwd: Path) -> tuple[int, bytes]:
    """Run the command with stdout and stderr on a pseudo-terminal (progress bars shown)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "COLUMNS": "100"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_transformer", *argv],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
    )  # fmt: skip
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(timeout=120), out


@pytest.mark.parametrize(
    "vocab_size, bad_byte, message",
    [
        (300, False, "vocabulary size 300 is too small: this corpus needs"),  # sentencepiece's
        (0, False, "--vocab-size 0 is too small"),  # ours, before reading
        (8000, True, "bad.txt: invalid UTF-8 at byte"),  # mid-reading: the bar is cut short
    ],
)
def test_error_line_stands_alone_after_a_progress_bar(
    tmp_path, tiny_corpus_text, vocab_size, bad_byte, message
):
    data = tmp_path / "bad.txt"
    data.write_bytes(tiny_corpus_text.encode() * 4 + (b"\xff" if bad_byte else b""))
    code, raw = run_on_a_terminal(
        ["prepare", "--data", data.name, "--out", "ds", "--vocab-size", str(vocab_size)], tmp_path
    )
    assert code == 2, raw
    shown = screen_lines(raw)
    # The error is the last line, whole: a bar cut short by it was ended (cleared) first; one
    # that finished (sentencepiece read the whole corpus) stays on its own line above.
    assert shown[-1].startswith(f"mlx-transformer prepare: error: {message}"), shown
    assert all(line.startswith("reading: 100%") for line in shown[:-1]), shown
    assert "INTERNAL" not in shown[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt"]


def test_data_that_is_neither_file_nor_folder(tmp_path, capsys):
    assert main(["prepare", "--data", "/dev/zero", "--out", str(tmp_path / "ds")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--data path /dev/zero is neither a file nor a folder" in line  # it exists
    assert not any(tmp_path.iterdir())


# --- a full or read-only disk: one line, nothing half-written, the previous dataset whole ---------


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs (root, where `mount` works); its path. Unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount for a small tmpfs (a full or read-only disk)")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def prepared_on(disk: Path, corpus_file: Path, tok) -> tuple[Path, list[str]]:
    ds = disk / "ds"
    prepare([corpus_file], ds, tokenizer=tok.path)
    return ds, ["prepare", "--data", str(corpus_file), "--out", str(ds), "--tokenizer",
                str(tok.path), "--val-fraction", "0.2", "--overwrite"]  # fmt: skip


def test_full_disk_leaves_the_previous_dataset_whole(small_disk, corpus_file, tok, capsys):
    ds, argv = prepared_on(small_disk, corpus_file, tok)
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    size = sum(p.stat().st_size for p in ds.iterdir())
    (small_disk / "filler").write_bytes(b"\0" * max(free - size // 2, 0))  # room for half of it
    before = fingerprint(small_disk)
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot write {ds}: No space left on device" in line and "nothing was changed" in line
    assert fingerprint(small_disk) == before  # no temporary folder left, the dataset whole
    assert load_dataset(ds).manifest["val_fraction"] == 0.1


def test_read_only_disk_leaves_the_previous_dataset_whole(small_disk, corpus_file, tok, capsys):
    ds, argv = prepared_on(small_disk, corpus_file, tok)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    before = fingerprint(small_disk)
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot write {ds}: Read-only file system" in line
    assert fingerprint(small_disk) == before
    assert load_dataset(ds).manifest["val_fraction"] == 0.1


def test_folder_without_write_permission(tmp_path, corpus_file, tok, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere: the read-only tmpfs test covers this as root")
    parent = tmp_path / "locked"
    ds, argv = prepared_on(parent, corpus_file, tok)
    parent.chmod(0o555)
    try:
        before = fingerprint(parent)
        assert main(argv) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"cannot write {ds}: Permission denied" in line
        assert fingerprint(parent) == before
    finally:
        parent.chmod(0o755)


# --- reading a dataset: what is not one is one line ----------------------------------------


def bad_manifest(edit):
    def make(ds: Path) -> None:
        m = json.loads((ds / "manifest.json").read_text())
        (ds / "manifest.json").write_text(json.dumps(edit(m)))

    return make


def drop(m, *path):
    target = m
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return m


def put(m, value, *path):
    target = m
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return m


NOT_DATASETS = {
    "a JSON list": (bad_manifest(lambda m: [1, 2, 3]), r"expected a JSON object, found a list"),
    "a JSON string": (bad_manifest(lambda m: "x"), r"expected a JSON object, found a string"),
    "no tokenizer": (bad_manifest(lambda m: drop(m, "tokenizer")), r"tokenizer is missing"),
    "no tokenizer sha256": (
        bad_manifest(lambda m: drop(m, "tokenizer", "sha256")),
        r"tokenizer.sha256 is missing",
    ),
    "no splits": (bad_manifest(lambda m: drop(m, "splits")), r"splits is missing or not an obj"),
    "no train split": (
        bad_manifest(lambda m: drop(m, "splits", "train")),
        r"splits must be train \(and val\), found \['val'\]",
    ),
    "no shard list": (
        bad_manifest(lambda m: drop(m, "splits", "train", "shards")),
        r"splits.train.shards is missing or not a list",
    ),
    "a shard without tokens": (
        bad_manifest(lambda m: drop(m, "splits", "val", "shards", 0, "tokens")),
        r"splits.val.shards\[0\].tokens is missing or not a count",
    ),
    "a shard outside the folder": (
        bad_manifest(lambda m: put(m, "../../etc/passwd", "splits", "train", "shards", 0, "file")),
        r"splits.train.shards\[0\].file is missing or not a file name",
    ),
    "a negative count": (
        bad_manifest(lambda m: put(m, -1, "splits", "train", "tokens")),
        r"splits.train.tokens is missing or not a count",
    ),
    "no special ids": (
        bad_manifest(lambda m: drop(m, "tokenizer", "special_ids")),
        r"tokenizer.special_ids is missing",
    ),
    "manifest.json is a folder": (
        lambda ds: (ds / "manifest.json").unlink() or (ds / "manifest.json").mkdir(),
        r"cannot read .*manifest.json: Is a directory",
    ),
}


@pytest.mark.parametrize("spoil, message", NOT_DATASETS.values(), ids=NOT_DATASETS.keys())
def test_manifest_that_is_not_ours_is_one_line(tmp_path, corpus_file, tok, spoil, message):
    ds = tmp_path / "ds"
    prepare([corpus_file], ds, tokenizer=tok.path)
    spoil(ds)
    with pytest.raises(UserError, match=message) as e:
        load_dataset(ds)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("data", ["/dev/zero", "file.txt"])
def test_data_that_is_not_a_dataset_folder(tmp_path, capsys, monkeypatch, data):
    (tmp_path / "file.txt").write_text("text\n")
    with pytest.raises(UserError, match=rf"{re.escape(data)} is not a folder: a dataset is "):
        load_dataset(data if data.startswith("/") else tmp_path / data)
    # and through the command that reads it
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", data, "--out", "run", "--max-steps", "1"]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert f"{data} is not a folder" in line and "does not exist" not in line
