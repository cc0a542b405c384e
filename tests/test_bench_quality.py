"""The time-to-quality benchmark (scripts/bench_quality.py) and the recipe it measures: the
shipped shakespeare_char_fast preset resolves as `train --config` reads it, the bookkeeping
(interpolation, ratios, rows) on fixed numbers, and the `--quick` run end to end. No timing
asserts."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_transformer.config import ModelConfig
from mlx_transformer.train import args as train_args

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_quality_report  # noqa: E402
import bench_readme  # noqa: E402


def test_fast_recipe_resolves_as_train_reads_it():
    parser = argparse.ArgumentParser()
    train_args.add_arguments(parser)
    ns = parser.parse_args(["--config", "shakespeare_char_fast", "--data", "d", "--out", "o"])
    args = train_args.resolve(ns)
    args.validate()
    nanogpt = train_args.resolve(
        parser.parse_args(["--config", "shakespeare_char", "--data", "d", "--out", "o"])
    )
    # The modern block, on the nanoGPT recipe's width, depth and data.
    config = ModelConfig(vocab_size=320, **args.model)
    assert (config.position_encoding, config.norm_type, config.hidden_act) == (
        "rope",
        "rmsnorm",
        "swiglu",
    )
    assert config.hidden_size == ModelConfig(vocab_size=320, **nanogpt.model).hidden_size
    assert args.max_steps < nanogpt.max_steps and args.learning_rate > nanogpt.learning_rate
    comment = json.loads((train_args.RECIPES / "shakespeare_char_fast.json").read_text())
    assert "1.898" in comment["_comment"]


def curve(points: list[tuple[int, float, float]], target: float = 2.0) -> dict:
    c = bench_quality_report.Curve("run", every=100, target=target, stop_at_target=False)
    for step, seconds, loss in points:
        c.add(step, seconds, 0.5, loss)
    return c.result({})


def test_time_to_target_first_checkpoint_and_interpolated():
    r = curve([(100, 10.0, 2.5), (200, 20.0, 2.2), (300, 30.0, 1.9), (400, 40.0, 1.8)])
    assert r["step_at_target"] == 300 and r["first_checkpoint_s"] == 30.0
    assert r["interpolated_s"] == pytest.approx(20.0 + 10.0 * (2.2 - 2.0) / (2.2 - 1.9), abs=1e-3)
    assert r["final_val_nats_per_char"] == 1.8 and r["steps"] == 400 and r["eval_s"] == 2.0
    never = curve([(100, 10.0, 2.5), (200, 20.0, 2.1)])
    assert never["interpolated_s"] is None and never["step_at_target"] is None
    first = curve([(100, 10.0, 1.5)])  # below at the first checkpoint: nothing before it
    assert first["interpolated_s"] == first["first_checkpoint_s"] == 10.0


def test_ratios_are_the_baselines_time_over_the_runs_and_become_rows():
    runs = {
        "shakespeare_char": curve([(100, 10.0, 2.5), (200, 40.0, 1.9)]),
        "shakespeare_char_fast": curve([(100, 10.0, 1.95)]),
        "torch": curve([(100, 30.0, 2.4), (200, 60.0, 1.9)]),
    }
    ratios = bench_quality_report.ratio_rows(runs, ["torch", "shakespeare_char"])
    pairs = {(r["run"], r["vs"]): r for r in ratios}
    assert set(pairs) == {
        ("shakespeare_char", "torch"),
        ("shakespeare_char_fast", "torch"),
        ("shakespeare_char_fast", "shakespeare_char"),
    }
    ours = runs["shakespeare_char"]["interpolated_s"]
    r = pairs[("shakespeare_char", "torch")]
    assert r["interpolated_s"] == pytest.approx(runs["torch"]["interpolated_s"] / ours, abs=1e-3)
    assert pairs[("shakespeare_char_fast", "shakespeare_char")]["first_checkpoint_s"] == 4.0
    rows = bench_readme.rows_quality({"target": 2.0, "runs": runs, "ratios": ratios})
    assert [(x["ours"], x["peer"]) for x in rows] == list(pairs)
    assert rows[0]["ratio"] == r["interpolated_s"] and rows[0]["ours_value"] == ours


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    """Ten steps of our nanoGPT recipe and of PyTorch's, evaluated every five: the table, the
    JSON and the ratio printed from them."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "quality.json"
    cmd = [sys.executable, str(SCRIPTS / "bench_quality.py"), "--quick", "--data"]
    cmd += [str(tmp_path / "data"), "--recipes", "shakespeare_char", "--torch-threads", "1"]
    proc = subprocess.run(cmd + ["--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["target"] == 5.5 and set(results["runs"]) == {"shakespeare_char", "torch"}
    for run in results["runs"].values():
        assert [p["step"] for p in run["curve"]] == [5, 10]
        # From ln(320) = 5.77 at the start, both go below the quick target.
        assert run["step_at_target"] in (5, 10) and run["final_val_nats_per_char"] < 5.5
    (ratio,) = results["ratios"]
    assert (ratio["run"], ratio["vs"]) == ("shakespeare_char", "torch")
    ours, torch = (results["runs"][k]["interpolated_s"] for k in ("shakespeare_char", "torch"))
    assert ratio["interpolated_s"] == pytest.approx(torch / ours, abs=1e-3)
    printed = re.search(r"\| shakespeare_char \| torch \| ([0-9.]+)x \|", proc.stdout)
    assert printed and float(printed.group(1)) == pytest.approx(ratio["interpolated_s"], abs=0.01)
    assert "load average" in proc.stdout
