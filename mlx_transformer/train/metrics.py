"""metrics.jsonl and loss.png of a run folder (the log appended line by line, the curve redrawn
off the training thread), and the numbers and progress bar behind each log line."""

from __future__ import annotations

import io
import json
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .. import atomic


class MetricsLog:
    """metrics.jsonl, appended line by line; on resume, lines after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and path.is_file():
            for line in path.read_bytes().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash (or a full disk)
                if isinstance(record, dict) and _step_of(record) <= resume_step:
                    self.records.append(record)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _step_of(record: dict[str, Any]) -> float:
    step = record.get("step", 0)
    return step if isinstance(step, (int, float)) else float("inf")


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
    matplotlib (its first import alone takes a second or more). `close()` waits for the last;
    a failed write (full disk) is raised in the loop's thread by the next `submit` or by
    `raise_error`, never printed by the thread."""

    def __init__(self, path: Path):
        self.path = path
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None

    def submit(self, records: list[dict[str, Any]]) -> None:
        self.close()  # one drawing at a time; evaluations are far apart
        self.raise_error()
        snapshot = list(records)
        self._thread = threading.Thread(target=self._draw, args=(snapshot,), daemon=True)
        self._thread.start()

    def _draw(self, records: list[dict[str, Any]]) -> None:
        try:
            plot_loss(records, self.path)
        except OSError as e:
            self._error = e

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error


class StepWindow:
    """Train losses and step times since the last metrics line."""

    def __init__(self):
        self.reset()
        self.last_loss = self.last_norm = float("nan")

    def reset(self) -> None:
        self.losses: list[float] = []
        self.seconds: list[float] = []

    def add(self, loss: float, norm: float, seconds: float) -> None:
        self.losses.append(loss)
        self.seconds.append(seconds)
        self.last_loss, self.last_norm = loss, norm

    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses)

    def tokens_per_sec(self, tokens_per_step: int) -> float:
        # The first step of a window may include compilation; a median is robust to it.
        return tokens_per_step / float(np.median(self.seconds[-50:]))


def progress_bar(args, rank: int, start: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=args.max_steps,
        initial=start,
        unit="step",
        dynamic_ncols=True,
        disable=not args.progress or rank != 0,
        file=sys.stderr,
    )
