"""One `train` per run folder: a second training on a live run is refused in one line, a killed
training's lock is taken over, and the lock goes on every exit. Real processes (`python -m
mlx_transformer train`) on test_train_safety's helpers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import test_train
from test_train_safety import ARCH, EXPLODE, ROOT, cli, one_line

# test_train's tiny prepared dataset.
data_dir = test_train.data_dir


def train_process(data: Path, out: Path, *flags: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlx_transformer", "train", "--data", str(data), "--out"]
    cmd += [str(out), "--no-progress", "--batch-size", "4", "--log-every", "1", *flags]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(condition, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def steps_logged(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


# -- one train per run folder ---------------------------------------------------------------------


def test_two_trainings_on_one_folder(data_dir, tmp_path, capsys):
    """Two `train`s started together on one --out: one runs, the other is refused in one line
    naming the first's PID; `--resume` while it runs is refused too; readers are not blocked;
    the lock goes with the run."""
    out = tmp_path / "run"
    flags = ("--max-steps", "100000", "--save-every", "3", *ARCH)
    procs = [train_process(data_dir, out, *flags) for _ in range(2)]
    try:
        wait_for(lambda: any(p.poll() is not None for p in procs), timeout=90)
        refused = next(p for p in procs if p.poll() is not None)
        live = next(p for p in procs if p is not refused)
        assert live.poll() is None
        err = refused.communicate()[1].decode()
        assert refused.returncode == 2
        assert f"is in use by another training (PID {live.pid}" in one_line(err)
        wait_for(lambda: (out / "latest").exists(), live)

        code, err = cli(capsys, "train", "--data", data_dir, "--out", out, "--resume")
        assert code == 2 and f"(PID {live.pid}" in one_line(err)
        code, err = cli(
            capsys, "generate", "--model", out / "latest", "--prompt", "To", "--max-tokens", 3
        )
        assert code == 0, err
        assert cli(capsys, "info", out / "latest")[0] == 0
        other = tmp_path / "other"  # a new run may start from the live run's checkpoint
        code, err = cli(
            capsys, "train", "--data", data_dir, "--out", other, "--init-from", out / "latest",
            "--max-steps", 1, "--no-progress",
        )  # fmt: skip
        assert code == 0, err
        assert json.loads((out / "train.lock").read_text())["pid"] == live.pid
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
    _, err = live.communicate(timeout=60)
    assert live.returncode == 130, err.decode()[-2000:]
    assert not (out / "train.lock").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]  # one writer: every step once, in order
    assert steps == list(range(1, len(steps) + 1))


def test_a_killed_trainings_lock_is_taken_over(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    proc = train_process(data_dir, out, "--max-steps", "100000", "--save-every", "2", *ARCH)
    try:
        wait_for(lambda: (out / "latest").exists() and steps_logged(out) >= 3, proc)
    finally:
        proc.kill()
        proc.wait()
    assert json.loads((out / "train.lock").read_text())["pid"] == proc.pid
    step = json.loads((out / "latest/training_state/state.json").read_text())["step"]
    code, err = cli(
        capsys, "train", "--data", data_dir, "--out", out, "--resume", "--max-steps", step + 1
    )
    assert code == 0, err
    assert f"took over the lock of PID {proc.pid}" in err
    assert not (out / "train.lock").exists()


def test_the_lock_goes_on_every_exit(data_dir, tmp_path, capsys):
    """A refused start leaves no folder behind; a failure during training no lock."""
    out = tmp_path / "new" / "run"
    code, err = cli(
        capsys, "train", "--data", data_dir, "--out", out, "--context-length", 999, *ARCH
    )
    assert code == 2 and "--context-length 999" in one_line(err)
    assert not (tmp_path / "new").exists()
    flags = ("--max-steps", 3, *EXPLODE, "--no-progress", *ARCH)
    code, err = cli(capsys, "train", "--data", data_dir, "--out", out, *flags)
    assert code == 2 and "last good checkpoint: none yet" in one_line(err)
    assert not (out / "train.lock").exists()
