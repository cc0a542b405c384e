"""Training never loses work: what a diverging, a second, a killed, an oversized or a starved
`train` may not do to a run folder.

Each test drives the command line (`mlx_transformer.cli.main`, in this process, or a separate
`python -m mlx_transformer` where two processes or a signal are the point) and checks the
user-facing result: exit code 2 with one line on stderr, and the run folder's checkpoints byte
for byte as they were. Tiny models (test_train.TINY) on the ~50 KB corpus. Two trainings on one
run folder are in test_run_lock.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import fingerprint
from test_train import data_dir, targs, weights  # noqa: F401  data_dir is a fixture
from test_train_step import TINY

from mlx_transformer.cli import main
from mlx_transformer.data.prepare import prepare
from mlx_transformer.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
ARCH = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
# lr 1e30 without clipping or warm-up: within a few steps the weights blow up.
EXPLODE = ("--learning-rate", 1e30, "--grad-clip", 0, "--warmup-steps", 0)


def checkpoints(run: Path) -> dict[str, str]:
    """What a run must never lose: its checkpoints, best/ and where latest points."""
    prints = {"latest": os.readlink(run / "latest")}
    for name in ("checkpoints", "best"):
        prints.update({f"{name}/{k}": v for k, v in fingerprint(run / name, folders=False).items()})
    return prints


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Run the command line in this process: (exit code, stderr)."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    """The one error line of a failed command (after any progress lines such as evaluations)."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("mlx-transformer ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert all(line.startswith("step ") for line in lines[:-1]), err
    return errors[0]


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def base_run(data_dir, tmp_path_factory) -> Path:  # noqa: F811
    """A finished 4-step run: checkpoints/step_000002 and step_000004, best/, latest."""
    out = tmp_path_factory.mktemp("base") / "run"
    train(targs(data_dir, out, max_steps=4, save_every=2, eval_every=2))
    return out


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    """A private copy of base_run."""
    out = tmp_path / "run"
    shutil.copytree(base_run, out, symlinks=True)
    return out


# -- a diverging update is never saved ------------------------------------------------------------


@pytest.mark.parametrize("eval_every", [0, 1])
def test_exploded_weights_are_never_saved_as_last_good(run, data_dir, capsys, eval_every):  # noqa: F811
    """lr 1e30 without clipping: step 5's update leaves weights of ~1e29 (finite) whose loss is
    NaN. Step 5 must not be saved, rotation must not delete step 4, latest stays on step 4 and
    the message names it (with an evaluation at the step, its loss is the check)."""
    before = checkpoints(run)
    config = (run / "run_config.json").read_bytes()
    flags = ("--resume", "--max-steps", 20, *EXPLODE, "--save-every", 1, "--keep-last", 1)
    flags += ("--eval-every", eval_every, "--no-progress")
    code, err = cli(capsys, "train", "--data", data_dir, "--out", run, *flags)
    assert code == 2
    line = one_line(err)
    assert "after step 5 the weights" in line
    assert line.split("last good checkpoint: ")[1].startswith(str(run / "checkpoints/step_000004"))
    assert checkpoints(run) == before
    assert (run / "run_config.json").read_bytes() == config  # the settings --resume reuses
    assert all(np.isfinite(w).all() for w in weights(run / "latest").values())
    assert not (run / "train.lock").exists()


def test_rotation_keeps_the_checkpoint_just_written(run, data_dir, capsys):  # noqa: F811
    """A step folder newer than `latest` (left by a run killed between writing it and moving
    latest) must not make keep-last rotation delete the checkpoint it has just written."""
    shutil.copytree(run / "checkpoints/step_000004", run / "checkpoints/step_000099")
    flags = ("--resume", "--max-steps", 5, "--keep-last", 1, "--no-progress")
    code, err = cli(capsys, "train", "--data", data_dir, "--out", run, *flags)
    assert code == 0, err
    assert os.readlink(run / "latest") == "checkpoints/step_000005"
    assert (run / "latest" / "model.safetensors").is_file()
    # The older steps went whole, through a rename: nothing half-deleted is left.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_000005",
        "step_000099",
    ]


# -- what a step needs, before allocating it -------------------------------------------------------


def test_a_batch_beyond_memory_is_refused_before_allocating(data_dir, tmp_path):  # noqa: F811
    """--batch-size 10**9 is refused with what it would need, under an address-space limit
    that the old code's first batch (7.5 GiB of window starts) broke with a MemoryError."""

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mlx_transformer", "train", "--data", str(data_dir), "--out"]
    cmd += [str(out), "--batch-size", str(10**9), "--max-steps", "2", "--no-progress", *ARCH]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=limit_memory
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_line(proc.stderr)
    assert "--batch-size 1000000000 at 16 tokens per sequence needs at least" in line
    assert "TB of memory" in line and "is available" in line
    assert not out.exists()


# -- a checkpoint of another tokenizer, or of ruined weights ---------------------------------------


def test_init_from_a_checkpoint_of_another_tokenizer_is_refused(
    base_run, tmp_path, tiny_corpus_text, capsys
):
    """A dataset prepared with another (smaller) tokenizer fits the model's vocabulary, so only
    the tokenizer's checksum in the manifest tells them apart."""
    (tmp_path / "corpus.txt").write_text(tiny_corpus_text)
    other = tmp_path / "other"
    prepare([tmp_path / "corpus.txt"], other, vocab_size=350)
    out = tmp_path / "run"
    for extra in ((), ("--lora",)):
        code, err = cli(
            capsys,
            "train",
            "--data",
            other,
            "--out",
            out,
            "--init-from",
            base_run / "latest",
            "--max-steps",
            2,
            "--no-progress",
            *extra,
        )
        assert code == 2
        assert "uses another tokenizer than the dataset" in one_line(err)
        assert f"prepare --tokenizer {base_run / 'latest'}" in err
        assert not out.exists()


def poison(file: Path, name: str | None = None) -> str:
    """Multiply one tensor of a safetensors file by NaN; returns its name."""
    tensors = mx.load(str(file))
    name = name or sorted(tensors)[0]
    tensors[name] = tensors[name] * float("nan")
    mx.save_safetensors(str(file), tensors, {"format": "mlx"})
    return name


def test_init_from_nan_weights_names_the_weights(base_run, data_dir, tmp_path, capsys):  # noqa: F811
    ckpt = tmp_path / "ckpt"
    shutil.copytree(base_run / "latest", ckpt)
    name = poison(ckpt / "model.safetensors", "layers.0.mlp.up_proj.weight")
    out = tmp_path / "run"
    code, err = cli(
        capsys, "train", "--data", data_dir, "--out", out, "--init-from", ckpt, "--max-steps", 2,
        "--no-progress",
    )  # fmt: skip
    line = one_line(err)
    assert code == 2 and name in line and "NaN or infinity" in line
    assert "learning-rate" not in line
    assert not out.exists()


def test_resume_from_nan_adapters_names_the_weights(base_run, data_dir, tmp_path, capsys):  # noqa: F811
    """A LoRA run's adapters are not a checkpoint load_checkpoint reads: training checks them."""
    out = tmp_path / "lora"
    init = str(base_run / "latest")
    train(targs(data_dir, out, lora=True, init_from=init, model={}, max_steps=2, save_every=2))
    name = poison(out / "latest" / "adapters.safetensors")
    before = fingerprint(out, folders=False)
    code, err = cli(capsys, "train", "--data", data_dir, "--out", out, "--resume", "--max-steps", 4)
    line = one_line(err)
    assert code == 2 and "non-finite weights" in line and name in line
    assert "learning-rate" not in line
    assert fingerprint(out, folders=False) == before


# -- damaged files and disks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "file",
    [
        "checkpoints/step_000004/training_state/optimizer.safetensors",
        "checkpoints/step_000004/training_state/state.json",
        "run_config.json",
    ],
)
def test_resume_from_a_cut_file_names_it(run, data_dir, capsys, file):  # noqa: F811
    path = run / file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    before = fingerprint(run, folders=False)
    code, err = cli(capsys, "train", "--data", data_dir, "--out", run, "--resume", "--max-steps", 6)
    assert code == 2
    assert f"{path}" in one_line(err)
    assert fingerprint(run, folders=False) == before


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (root only), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)])
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_during_training_keeps_the_checkpoints(small_disk, base_run, data_dir, capsys):  # noqa: F811
    run = small_disk / "run"
    shutil.copytree(base_run, run, symlinks=True)
    before = checkpoints(run)
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - (40 << 10)))  # leave 40 KB
    flags = ("--resume", "--max-steps", 6, "--save-every", 1, "--no-progress")
    code, err = cli(capsys, "train", "--data", data_dir, "--out", run, *flags)
    assert code == 2
    line = one_line(err)
    assert "cannot write" in line and "latest: checkpoints/step_000004" in line
    assert checkpoints(run) == before
    assert not [p for p in run.rglob(".*") if ".tmp-" in p.name]  # nothing half-written left
    (small_disk / "filler").unlink()  # space again: the run goes on from where it was
    code, err = cli(capsys, "train", "--data", data_dir, "--out", run, "--resume", "--max-steps", 6)
    assert code == 0, err


def test_read_only_disk_is_one_line(small_disk, base_run, data_dir, capsys):  # noqa: F811
    run = small_disk / "run"
    shutil.copytree(base_run, run, symlinks=True)
    before = fingerprint(small_disk, folders=False)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    code, err = cli(capsys, "train", "--data", data_dir, "--out", run, "--resume", "--max-steps", 6)
    assert code == 2 and "Read-only file system" in one_line(err)
    assert fingerprint(small_disk, folders=False) == before


# -- what a killed writer left ---------------------------------------------------------------------


def test_a_killed_writers_leftovers_are_cleared(run, data_dir, capsys):  # noqa: F811
    """kill -9 while saving leaves `.step_N.tmp-PID/`, `.best.tmp-PID/`, `.best.old-PID/` (best/
    set aside, not yet replaced) and, in a rotation, `.step_N.del-PID/` (half deleted): the next
    `train` clears them and puts best/ back. A live PID's entries are left alone."""
    best = fingerprint(run / "best", folders=False)
    pid = dead_pid()
    for name in (f"checkpoints/.step_000006.tmp-{pid}", f".best.tmp-{pid}"):
        (run / name).mkdir()
        (run / name / "model.safetensors").write_bytes(b"half")
    shutil.copytree(run / "checkpoints/step_000002", run / f"checkpoints/.step_000001.del-{pid}")
    (run / f"checkpoints/.step_000001.del-{pid}/config.json").unlink()  # half deleted
    (run / "best").rename(run / f".best.old-{pid}")
    os.symlink("checkpoints/step_000002", run / f".latest.tmp-{pid}")
    live = run / f"checkpoints/.step_000008.tmp-{os.getppid()}"
    live.mkdir()
    code, err = cli(capsys, "train", "--data", data_dir, "--out", run, "--resume", "--max-steps", 4)
    assert code == 0, err
    left = sorted(p.name for p in [*run.iterdir(), *(run / "checkpoints").iterdir()])
    assert left == sorted(
        [
            ".step_000008.tmp-" + str(os.getppid()),
            "best",
            "checkpoints",
            "latest",
            "loss.png",
            "metrics.jsonl",
            "run_config.json",
            "step_000002",
            "step_000004",
        ]
    )
    assert fingerprint(run / "best", folders=False) == best
