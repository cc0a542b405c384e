"""The README's main job, end to end, at smoke-test size (`demo --quick`)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from mlx_transformer import demo
from mlx_transformer.train import args as train_args


def test_the_recipe_is_a_train_config_file():
    """The demo and `train --config` read the same shipped file (scripts/train_shakespeare_char.sh
    passes its path)."""
    parser = argparse.ArgumentParser()
    train_args.add_arguments(parser)
    recipe = train_args.RECIPES / demo.RECIPE
    ns = parser.parse_args(["--config", str(recipe), "--data", "d", "--out", "o"])
    args = train_args.resolve(ns)
    args.validate()
    assert (args.max_steps, args.batch_size, args.context_length, args.seed) == (2000, 12, 64, 1337)
    assert args.model["hidden_size"] == 128 and args.decay_steps is None
    # By name, as the README writes it: the same file.
    by_name = parser.parse_args(["--config", "shakespeare_char", "--data", "d", "--out", "o"])
    assert train_args.resolve(by_name) == args


@pytest.mark.slow
def test_demo_runs_the_whole_journey(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_transformer", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["train"]["steps"] == 60
    assert report["train"]["val"]["val_loss"] < 4.5  # from ln(320) = 5.77 at the start
    for flavour, providers in report["verify"].items():
        assert "CPUExecutionProvider" in providers, flavour
        assert all(p["ok"] for p in providers.values()), (flavour, providers)
    assert report["generate"]["greedy_equal"]
    for name in (
        "report.md",
        "train/loss.png",
        "inspect/attention.png",
        "inspect/logit_lens.png",
        "inspect/ablation.png",
        "onnx-ort/verify.md",
        "onnx-portable/onnx/model.onnx",
    ):
        assert (out / name).stat().st_size > 0, name
    assert "identical text" in (out / "report.md").read_text()
    # A second run into the same folder is refused, with one line and nothing touched.
    again = subprocess.run(
        [sys.executable, "-m", "mlx_transformer", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "already exists" in again.stderr
    assert again.stderr.count("\n") == 1
