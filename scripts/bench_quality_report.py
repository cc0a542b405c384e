"""Time to quality, the bookkeeping of scripts/bench_quality.py: each run's checkpoints (training
seconds and whole-val loss), the time to the target read from them, ratios between runs, the
table and the curve picture. Imports neither MLX nor torch."""

from __future__ import annotations

import io
import sys
from pathlib import Path

TORCH = "torch"  # the label of the PyTorch run


class Curve:
    """Checkpoints of one run: training seconds so far and whole-val loss at each."""

    def __init__(self, label: str, every: int, target: float, stop_at_target: bool):
        self.label, self.every, self.target, self.stop = label, every, target, stop_at_target
        self.points: list[dict] = []

    def due(self, step: int, last: int) -> bool:
        return step % self.every == 0 or step == last

    def add(self, step: int, train_s: float, eval_s: float, nats_per_char: float) -> bool:
        """Record a checkpoint and print it; True when the run should stop here."""
        self.points.append(
            {
                "step": step,
                "train_s": round(train_s, 3),
                "eval_s": round(eval_s, 3),
                "val_nats_per_char": round(nats_per_char, 5),
            }
        )
        print(
            f"  {self.label} step {step}: val {nats_per_char:.4f} nats/char after "
            f"{train_s:.1f}s training (eval {eval_s:.1f}s)",
            file=sys.stderr,
            flush=True,
        )
        return self.stop and nats_per_char <= self.target

    def result(self, config: dict) -> dict:
        hit = next(
            (i for i, p in enumerate(self.points) if p["val_nats_per_char"] <= self.target), None
        )
        out = {"config": config, "curve": self.points, "target": self.target}
        last = self.points[-1] if self.points else {}
        out["final_val_nats_per_char"] = last.get("val_nats_per_char")
        out["steps"], out["train_s"] = last.get("step"), last.get("train_s")
        out["eval_s"] = round(sum(p["eval_s"] for p in self.points), 3)
        out["first_checkpoint_s"] = out["interpolated_s"] = out["step_at_target"] = None
        if hit is not None:
            p = self.points[hit]
            out["first_checkpoint_s"], out["step_at_target"] = p["train_s"], p["step"]
            out["interpolated_s"] = interpolate(
                self.points[hit - 1] if hit else None, p, self.target
            )
        return out


def interpolate(before: dict | None, after: dict, target: float) -> float:
    """Training seconds at which the loss crossed `target`, linear between two checkpoints."""
    if before is None or before["val_nats_per_char"] <= after["val_nats_per_char"]:
        return after["train_s"]
    a, b = before["val_nats_per_char"], after["val_nats_per_char"]
    frac = (a - target) / (a - b)
    return round(before["train_s"] + frac * (after["train_s"] - before["train_s"]), 3)


def ratio_rows(runs: dict, baselines: list[str]) -> list[dict]:
    """For each run and each baseline: baseline's time to target / the run's (interpolated and
    at the first checkpoint), None where either never reached it."""
    rows = []
    for label, r in runs.items():
        for base in baselines:
            if base == label or base not in runs or label.startswith(TORCH):
                continue
            b = runs[base]
            row = {"run": label, "vs": base}
            for key in ("interpolated_s", "first_checkpoint_s"):
                row[key] = round(b[key] / r[key], 3) if b[key] and r[key] else None
            rows.append(row)
    return rows


def report(results: dict) -> str:
    def cell(v, digits=1):
        return "-" if v is None else f"{v:.{digits}f}"

    loads = ", ".join(f"{k} {v[0]}" for k, v in results["load_average"].items())
    n = results.get("val_batches")
    val = f"{n} batches of the validation split" if n else "the whole validation split"
    lines = [
        f"time to {results['target']} nats/char on {val} "
        f"(training wall time, evaluation excluded; load average at each start: {loads})",
        "",
        "| run | steps to target | s to target (interpolated) | s to target (first checkpoint) "
        "| final nats/char | steps | train s | eval s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in results["runs"].items():
        lines.append(
            f"| {label} | {r['step_at_target'] or '-'} | {cell(r['interpolated_s'])} "
            f"| {cell(r['first_checkpoint_s'])} | {cell(r['final_val_nats_per_char'], 4)} "
            f"| {r['steps']} | {cell(r['train_s'])} | {cell(r['eval_s'])} |"
        )
    lines += [
        "",
        "| run | vs | ratio (interpolated) | ratio (first checkpoint) |",
        "|---|---|---|---|",
    ]
    for row in results["ratios"]:
        lines.append(
            f"| {row['run']} | {row['vs']} | {_x(row['interpolated_s'])} "
            f"| {_x(row['first_checkpoint_s'])} |"
        )
    return "\n".join(lines)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def plot(results: dict, path: Path) -> None:
    """Whole-val loss against training seconds, one line per run, the target dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mlx_transformer.atomic import write_bytes

    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, r in results["runs"].items():
        pts = r["curve"]
        ax.plot(
            [p["train_s"] for p in pts],
            [p["val_nats_per_char"] for p in pts],
            "o-",
            ms=3,
            label=label,
        )
    ax.axhline(results["target"], ls="--", c="gray", lw=1)
    ax.text(0, results["target"], f" {results['target']}", va="bottom", color="gray", fontsize=8)
    lows = [p["val_nats_per_char"] for r in results["runs"].values() for p in r["curve"]]
    if lows:
        ax.set_ylim(min(min(lows), results["target"]) - 0.05, min(max(lows), 3.0) + 0.05)
    ax.set_xlabel("training wall time, s (evaluation excluded)")
    ax.set_ylabel("whole-validation loss, nats/char")
    ax.set_title(f"Tiny Shakespeare, char level ({results['machine']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, buf.getvalue())
