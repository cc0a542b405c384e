"""The run folder: checkpoints with their training state, metrics.jsonl and the loss curve.

OUT/
  train.lock                  while a `train` process uses the folder: its PID and host
  run_config.json             the resolved TrainingArgs + ModelConfig of the latest invocation
                              (a resumed one's once it saved a checkpoint)
  metrics.jsonl               one JSON object per log line (train) or evaluation (val)
  loss.png                    train and val loss against step, redrawn at each evaluation
  checkpoints/step_000500/    a checkpoint folder (checkpoint/) + training_state/; the last K kept
  best/                       the checkpoint with the lowest val loss so far
  latest -> checkpoints/step_000500   what generate/export/--resume use

training_state/ = optimizer.safetensors (AdamW moments, step, lr) + state.json (step, tokens
seen, best val loss, seed and data position). No pickle. Every folder is written under a
temporary name and renamed into place, and `latest` is switched with an atomic rename, so a
crash or Ctrl-C at any moment leaves the previous checkpoint whole; an old step is renamed out of
the way before it is deleted, and what a killed writer left is cleared at the next start. Only
checkpoints whose weights were checked finite are written (see `Trainer.save`), so `latest`,
`best` and every step kept are usable. One `train` at a time: `run_lock.RunLock`.
metrics.jsonl and loss.png are written by `metrics`.
A LoRA run's checkpoints hold adapters.safetensors + adapter_config.json instead of the model.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .. import atomic
from ..checkpoint.format import TRAINING_STATE_DIR
from ..checkpoint.mlx_io import save_checkpoint
from ..errors import UserError
from ..tokenizer_files import copy_tokenizer
from .lora import save_adapters
from .run_lock import RunLock

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
# What a writer leaves beside its destination while it works (see atomic): `.NAME.KIND-PID`.
TEMPORARY = re.compile(r"^\.(.+)\.(tmp|old|del)-\d+$")


class RunFolder:
    """Paths and checkpoint bookkeeping of one run folder (only rank 0 writes)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.checkpoints = self.out / "checkpoints"
        self.latest = self.out / "latest"
        self.best = self.out / "best"
        self.metrics = self.out / "metrics.jsonl"
        self.plot = self.out / "loss.png"
        self.run_config = self.out / "run_config.json"
        self.lock = RunLock(self.out)

    def step_dirs(self) -> list[Path]:
        """Step checkpoints, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir() if STEP_DIR.match(p.name) and p.is_dir()]
        return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))

    def has_run(self) -> bool:
        return self.latest.exists() or bool(self.step_dirs())

    def resume_point(self) -> Path:
        """The checkpoint to resume from: `latest`, else the newest step folder."""
        if self.latest.exists():
            return self.latest.resolve()
        dirs = self.step_dirs()
        if not dirs:
            raise UserError(
                f"nothing to resume in {self.out} (no checkpoints/); drop --resume to start fresh"
            )
        return dirs[-1]

    def remove_stale_temporaries(self) -> None:
        """Clear what a killed writer left: unfinished `.NAME.tmp-PID` folders, the `.del-PID`
        of an interrupted rotation, and (put back) a `.best.old-PID` it had set aside. Call with
        the lock held; a PID that still runs keeps its entries."""
        for folder in (self.out, self.checkpoints):
            if not folder.is_dir():
                continue
            names = {m.group(1) for p in folder.iterdir() if (m := TEMPORARY.match(p.name))}
            for name in sorted(names):
                atomic.remove_stale_temporaries(folder / name)

    def save(
        self,
        step: int,
        model,
        optimizer,
        state: dict[str, Any],
        tokenizer_path: Path | None,
        lora_config: dict | None,
        keep_last: int,
    ) -> Path:
        """Write checkpoints/step_N/ atomically, point `latest` at it, drop the oldest.

        Rotation never removes the folder just written nor the one `latest` points at, and
        renames each old step out of the way before deleting it: a kill never leaves a
        half-deleted `step_N` that looks like a checkpoint.
        """
        folder = self.checkpoints / f"step_{step:06d}"
        with self.writing(f"checkpoint {folder.name}"):
            write_checkpoint(folder, model, optimizer, state, tokenizer_path, lora_config)
            atomic.replace_symlink(self.latest, Path("checkpoints") / folder.name)
        keep = {folder.resolve(), self.latest.resolve()}
        for old in self.step_dirs()[:-keep_last]:
            if old.resolve() not in keep:
                try:
                    atomic.remove_folder(old)
                except OSError:
                    pass  # e.g. the disk turned read-only: an extra old checkpoint, nothing lost
        return folder

    def save_best(self, source: Path) -> None:
        """Copy a just-written checkpoint folder to best/ (atomically)."""
        with self.writing("best/"):
            atomic.write_folder(self.best, lambda tmp: _copy_folder(source, tmp))

    def write_run_config(self, config: dict[str, Any]) -> None:
        with self.writing(self.run_config.name):
            self.out.mkdir(parents=True, exist_ok=True)
            atomic.write_text(self.run_config, json.dumps(config, indent=2) + "\n")

    @contextlib.contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """A failed write (full or read-only disk, permissions) of `what` becomes one line that
        says what is kept: every write here is atomic, so the earlier checkpoints are whole."""
        try:
            yield
        except OSError as e:
            fix = "make it writable" if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else ""
            raise UserError(self._write_failure(what, e.strerror or str(e), fix)) from None
        except RuntimeError as e:
            if not atomic.failed_write(e):  # only a failed write is the disk's; the rest are bugs
                raise
            try:
                free = f" ({shutil.disk_usage(self.out).free / 1e6:,.1f} MB free on that disk)"
            except OSError:
                free = ""
            reason = " ".join(str(e).split()).rstrip(".") + free
            raise UserError(self._write_failure(what, reason)) from None

    def _write_failure(self, what: str, reason: str, fix: str = "") -> str:
        self._forget_unsaved_run()
        if self.latest.exists():
            kept = f"the saved checkpoints are whole (latest: {os.readlink(self.latest)})"
            then = "then continue with --resume"
        else:
            kept, then = "no checkpoint had been saved yet", "then run again"
        fix = fix or "make room there"
        return f"cannot write {what} in {self.out}: {reason}; {kept}; {fix}, {then}"

    def _forget_unsaved_run(self) -> None:
        """A run that could not write before its first checkpoint, in a folder it created, leaves
        no half-written folder behind (the lock's release then removes the empty folder)."""
        if self.latest.exists() or self.step_dirs() or not self.lock.created_here:
            return
        for path in (self.run_config, self.metrics, self.plot):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.checkpoints.rmdir()


def _copy_folder(source: Path, dest: Path) -> None:
    """Copy `source`'s files into the existing folder `dest`, stopping at the first failure
    (shutil.copytree goes on and reports every file's error at the end, in one long line)."""
    for root, _, files in os.walk(source):
        target = dest / Path(root).relative_to(source)
        target.mkdir(exist_ok=True)
        for name in files:
            shutil.copy2(Path(root) / name, target / name)


def write_checkpoint(
    folder: Path,
    model,
    optimizer,
    state: dict[str, Any],
    tokenizer_path: Path | None,
    lora_config: dict | None,
) -> Path:
    """A checkpoint folder (or, for LoRA, an adapter folder) with training_state/ inside."""

    def write_state(tmp: Path) -> None:
        ts = tmp / TRAINING_STATE_DIR
        ts.mkdir()
        tensors = dict(tree_flatten(optimizer.state))
        mx.save_safetensors(str(ts / OPTIMIZER_FILE), tensors, {"format": "mlx"})
        atomic.write_text(ts / STATE_FILE, json.dumps(state, indent=2) + "\n")

    if lora_config is None:
        return save_checkpoint(folder, model, tokenizer_path, write_extra=write_state)

    def fill(tmp: Path) -> None:
        save_adapters(tmp, model, lora_config)
        if tokenizer_path is not None:
            copy_tokenizer(tokenizer_path, tmp)
        write_state(tmp)

    return atomic.write_folder(folder, fill)


def read_training_state(folder: Path) -> tuple[dict[str, Any], dict[str, mx.array]]:
    """(state.json, optimizer tensors) of a checkpoint; one line naming the file when either is
    missing, cut short or damaged."""
    ts = Path(folder) / TRAINING_STATE_DIR
    state_file, optimizer_file = ts / STATE_FILE, ts / OPTIMIZER_FILE
    damaged = "the checkpoint is damaged; point the run's `latest` at an earlier step to resume"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"{folder} has no {TRAINING_STATE_DIR}/{STATE_FILE}, so it cannot be resumed; "
            "use it with --init-from to start a new run from its weights"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read {state_file}: {e.strerror}") from None
    except ValueError:  # cut short, or not UTF-8 / JSON at all
        raise UserError(f"{state_file} is not valid JSON (cut short?); {damaged}") from None
    problem = _state_problem(state)
    if problem:
        raise UserError(f"{state_file}: {problem}; {damaged}")
    try:
        tensors = mx.load(str(optimizer_file))
    except (RuntimeError, ValueError, OSError) as e:
        reason = "not found" if not optimizer_file.is_file() else " ".join(str(e).split())
        raise UserError(f"{optimizer_file}: cannot be read ({reason}); {damaged}") from None
    if not isinstance(tensors, dict):
        raise UserError(f"{optimizer_file}: not a safetensors file; {damaged}")
    return state, tensors


def _state_problem(state: Any) -> str | None:
    """What is wrong with a state.json's content, or None (the fields resuming reads)."""
    if not isinstance(state, dict):
        return f"expected a JSON object, found {type(state).__name__}"
    for key in ("step", "tokens_seen"):
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{key} is missing or not a count"
    if not isinstance(state.get("data"), dict):
        return "data (the data position) is missing"
    best = state.get("best_val_loss")
    if best is not None and (not isinstance(best, (int, float)) or isinstance(best, bool)):
        return "best_val_loss is not a number"
    return None


def restore_optimizer(optimizer, tensors: dict[str, mx.array], parameters: dict) -> None:
    """Load saved optimizer tensors into an optimizer initialised on `parameters`."""
    current = dict(tree_flatten(optimizer.state))
    if set(current) != set(tensors):
        missing = sorted(set(current) ^ set(tensors))
        raise UserError(
            f"the saved optimizer state does not fit this model (differs at {missing[0]}); "
            "resume with the same model, precision and LoRA settings"
        )
    for name, value in current.items():
        if tuple(tensors[name].shape) != tuple(value.shape):
            raise UserError(
                f"the saved optimizer state does not fit this model ({name} has shape "
                f"{tuple(tensors[name].shape)}, the model needs {tuple(value.shape)}); resume "
                "with the same model, precision and LoRA settings"
            )
    optimizer.state = tree_unflatten(list(tensors.items()))
    optimizer.init(parameters)  # marks it initialised; keeps the loaded moments
