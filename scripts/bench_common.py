"""Helpers shared by the benchmark scripts: medians, ratios, tables, machine facts, workers.

Every runner of a benchmark runs in its own subprocess (`run_worker`), so that its peak resident
memory (`peak_rss_mb`) belongs to it alone; a worker prints one JSON object as its last line of
stdout. Nothing here imports MLX, torch or onnxruntime: versions are read from package metadata.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

PACKAGES = ("mlx", "mlx-lm", "torch", "transformers", "onnxruntime", "onnx", "numpy")


def median(values: Iterable[float]) -> float:
    """Median of the values (the middle one, or the mean of the two middle ones)."""
    return statistics.median(list(values))


def spread(values: Iterable[float]) -> float:
    """(max - min) / median of one measurement's trials: above 0.10 a row is flagged as noisy."""
    v = list(values)
    m = statistics.median(v) if v else 0.0
    return (max(v) - min(v)) / m if m else 0.0


NOISY = 0.10


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or not b:
        return None
    return a / b


def summarize(trials: Sequence[dict[str, float]]) -> dict[str, float]:
    """Median of each key over the trials (every trial has the same keys)."""
    return {k: median(t[k] for t in trials) for k in trials[0]}


def fmt(value, digits: int = 1) -> str:
    """A table cell: numbers with thousands separators, ratios as 1.23x, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, float) and not value == value:  # NaN
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}"
    return str(value)


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def print_json(results: dict, path: str | None) -> None:
    """Print the results as indented JSON on stdout and, given a path, write them there too."""
    text = json.dumps(results, indent=2)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    print(text)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A GitHub Markdown table; cells are used as given (format them first)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# -- the machine -----------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict:
    """CPU model, core count, OS, load average now, package versions."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "versions": versions(),
    }


# -- memory and workers ----------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB.

    On Linux this is VmHWM: getrusage's ru_maxrss survives fork and exec, so a worker started
    by a big parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    """Resident memory now, MiB (Linux; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError):
        return peak_rss_mb()


def emit(result: dict) -> None:
    """A worker's answer: one JSON line on stdout, last."""
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_worker(argv: Sequence[str], timeout: float = 1800) -> dict:
    """Run `python argv...` in a fresh process; its last stdout line parsed as JSON.

    A worker that fails returns {"error": the last lines of its stderr} instead of raising, so
    one broken peer does not lose the others' numbers.
    """
    tic = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, *argv], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        return {"error": f"exit {proc.returncode}: {tail}"}
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": f"no JSON result; last line: {lines[-1][:200]}"}
    result.setdefault("wall_s", round(time.perf_counter() - tic, 2))
    return result
