"""`mlx-transformer verify`: passes on a faithful export, fails (exit 1) on a tampered one."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from test_model import CONFIGS, random_model, tiny_config

from export import export_onnx
from export.contract import MODEL_FILE
from mlx_transformer.checkpoint.mlx_io import save_checkpoint
from mlx_transformer.cli import main
from mlx_transformer.verify import verify


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = random_model(tiny_config(**CONFIGS["rope-traditional-mqa"]))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), model)


@pytest.mark.parametrize("flavour", ["portable", "ort"])
def test_verify_passes_and_writes_reports(ckpt, flavour, tmp_path):
    export_onnx(ckpt, tmp_path / "onnx", flavour=flavour)
    report = verify(ckpt, tmp_path / "onnx", tokens=16)
    assert report["ok"], [r for r in report["checks"] if r["ok"] is False]
    checks = {(r["check"], r["provider"]): r for r in report["checks"]}
    cpu = "CPUExecutionProvider"
    assert checks[("placement", cpu)]["status"] == "full"
    assert checks[("greedy tokens", cpu)]["greedy_match"] == "16/16"
    assert checks[("prefill, empty past", cpu)]["max_abs_error"] < 1e-4
    assert (("onnx.reference evaluator", "-") in checks) == (flavour == "portable")
    assert json.loads((tmp_path / "onnx/verify.json").read_text())["ok"]
    assert (
        "| greedy tokens | CPUExecutionProvider | yes |"
        in (tmp_path / "onnx/verify.md").read_text()
    )


def test_verify_catches_a_wrong_weight(ckpt, tmp_path, capsys):
    out = tmp_path / "onnx"
    export_onnx(ckpt, out)
    proto = onnx.load(out / MODEL_FILE)
    for t in proto.graph.initializer:
        if t.name == "layers.1.mlp.down_proj.weight.T":
            value = onnx.numpy_helper.to_array(t) * np.float32(1.01)
            t.CopyFrom(onnx.numpy_helper.from_array(value, t.name))
    onnx.save(proto, out / MODEL_FILE)
    assert main(["verify", str(ckpt), str(out), "--tokens", "8"]) == 1
    failed = {
        r["check"]
        for r in json.loads((out / "verify.json").read_text())["checks"]
        if r["ok"] is False
    }
    assert {"weights equal the checkpoint", "prefill, empty past"} <= failed
    assert "**FAIL**" in capsys.readouterr().out
