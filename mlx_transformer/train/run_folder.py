"""The run folder: checkpoints with their training state, metrics.jsonl and the loss curve.

OUT/
  run_config.json             the resolved TrainingArgs + ModelConfig of the latest invocation
  metrics.jsonl               one JSON object per log line (train) or evaluation (val)
  loss.png                    train and val loss against step, redrawn at each evaluation
  checkpoints/step_000500/    a checkpoint folder (checkpoint/) + training_state/; the last K kept
  best/                       the checkpoint with the lowest val loss so far
  latest -> checkpoints/step_000500   what generate/export/--resume use

training_state/ = optimizer.safetensors (AdamW moments, step, lr) + state.json (step, tokens
seen, best val loss, seed and data position). No pickle. Every folder is written under a
temporary name and renamed into place, and `latest` is switched with an atomic rename, so a
crash or Ctrl-C at any moment leaves the previous checkpoint whole.
A LoRA run's checkpoints hold adapters.safetensors + adapter_config.json instead of the model.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .. import atomic
from ..checkpoint.format import TOKENIZER_FILE, TRAINING_STATE_DIR
from ..checkpoint.mlx_io import save_checkpoint
from ..errors import UserError
from .lora import save_adapters

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


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
        """Write checkpoints/step_N/ atomically, point `latest` at it, drop the oldest."""
        folder = self.checkpoints / f"step_{step:06d}"
        write_checkpoint(folder, model, optimizer, state, tokenizer_path, lora_config)
        atomic.replace_symlink(self.latest, Path("checkpoints") / folder.name)
        for old in self.step_dirs()[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    def save_best(self, source: Path) -> None:
        """Copy a just-written checkpoint folder to best/ (atomically)."""
        atomic.write_folder(self.best, lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True))

    def write_run_config(self, config: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.run_config, json.dumps(config, indent=2) + "\n")


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
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
        write_state(tmp)

    return atomic.write_folder(folder, fill)


def read_training_state(folder: Path) -> tuple[dict[str, Any], dict[str, mx.array]]:
    """(state.json, optimizer tensors) of a checkpoint; a clear error if it has none."""
    ts = Path(folder) / TRAINING_STATE_DIR
    try:
        state = json.loads((ts / STATE_FILE).read_text())
    except FileNotFoundError:
        raise UserError(
            f"{folder} has no {TRAINING_STATE_DIR}/{STATE_FILE}, so it cannot be resumed; "
            "use it with --init-from to start a new run from its weights"
        ) from None
    return state, mx.load(str(ts / OPTIMIZER_FILE))


def restore_optimizer(optimizer, tensors: dict[str, mx.array], parameters: dict) -> None:
    """Load saved optimizer tensors into an optimizer initialised on `parameters`."""
    current = dict(tree_flatten(optimizer.state))
    if set(current) != set(tensors):
        missing = sorted(set(current) ^ set(tensors))
        raise UserError(
            f"the saved optimizer state does not fit this model (differs at {missing[0]}); "
            "resume with the same model, precision and LoRA settings"
        )
    optimizer.state = tree_unflatten(list(tensors.items()))
    optimizer.init(parameters)  # marks it initialised; keeps the loaded moments


# -- metrics ---------------------------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl, appended line by line; on resume, lines after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if record.get("step", 0) <= resume_step:
                    self.records.append(record)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def plot_loss(records: list[dict[str, Any]], path: Path) -> None:
    """Train and val loss against step as a PNG (Agg canvas: never opens a window)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="val", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    atomic.write_bytes(path, png.getvalue())


class Plotter:
    """Draws loss.png on a background thread, so that the step loop does not wait for
    matplotlib (its first import alone takes a second or more). `close()` waits for the last."""

    def __init__(self, path: Path):
        self.path = path
        self._thread: threading.Thread | None = None

    def submit(self, records: list[dict[str, Any]]) -> None:
        self.close()  # one drawing at a time; evaluations are far apart
        snapshot = list(records)
        self._thread = threading.Thread(target=plot_loss, args=(snapshot, self.path), daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
