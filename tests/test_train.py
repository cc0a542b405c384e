"""Training runs: configuration, run folder, exact resume, signals, NaN handling, data parallel.

Tiny models (2 layers, width 32, context 16) on a ~50 KB corpus; the whole file runs in well
under a minute on two cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_train_step import TINY, concat

from mlx_transformer.checkpoint.mlx_io import load_checkpoint
from mlx_transformer.config import ModelConfig
from mlx_transformer.data.batches import PretrainBatches
from mlx_transformer.data.dataset import load_dataset
from mlx_transformer.data.prepare import prepare
from mlx_transformer.errors import UserError
from mlx_transformer.model import Transformer
from mlx_transformer.train import args as train_args
from mlx_transformer.train.args import TrainingArgs
from mlx_transformer.train.step import Stepper, make_optimizer, to_mx
from mlx_transformer.train.trainer import TrainingDiverged, step_seed, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_corpus_text, tiny_tokenizer_path) -> Path:
    root = tmp_path_factory.mktemp("train_data")
    (root / "corpus.txt").write_text(tiny_corpus_text)
    prepare([root / "corpus.txt"], root / "ds", tokenizer=tiny_tokenizer_path)
    return root / "ds"


def targs(data_dir: Path, out: Path, **overrides) -> TrainingArgs:
    base = dict(
        data=str(data_dir),
        out=str(out),
        model=dict(TINY),
        batch_size=4,
        max_steps=6,
        warmup_steps=2,
        learning_rate=3e-3,
        eval_every=0,
        eval_batches=2,
        log_every=1,
        save_every=3,
        progress=False,
    )
    return TrainingArgs(**{**base, **overrides})


def weights(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(load_checkpoint(path).parameters())}


def state_json(ckpt: Path) -> dict:
    return json.loads((ckpt / "training_state" / "state.json").read_text())


# -- configuration ------------------------------------------------------------------------------


def test_flags_match_the_dataclass():
    names = train_args.flag_names()
    for f in dataclasses.fields(TrainingArgs):
        if f.name != "model":
            assert f"--{f.name.replace('_', '-')}" in names
    for f in dataclasses.fields(ModelConfig):
        if f.name not in train_args.MODEL_FIELDS_NOT_FLAGS:
            assert f"--{f.name.replace('_', '-')}" in names


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_args.add_arguments(parser)
    return parser.parse_args(argv)


def test_config_file_then_flags_override(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"max-steps": 50, "batch_size": 3, "model": {"hidden_size": 48}}))
    ns = parse(["--config", str(cfg), "--data", "d", "--out", "o", "--batch-size", "5"])
    setattr(ns, "model.num_hidden_layers", 3)  # what --num-hidden-layers 3 sets
    args = train_args.resolve(ns)
    assert (args.max_steps, args.batch_size, args.learning_rate) == (50, 5, 1e-3)
    assert args.model == {"hidden_size": 48, "num_hidden_layers": 3}
    ns = parse(["--data", "d", "--out", "o", "--no-compile", "--lora-targets", "q_proj", "o_proj"])
    args = train_args.resolve(ns)
    assert args.compile is False and args.lora_targets == ["q_proj", "o_proj"]


@pytest.mark.parametrize(
    "content, message",
    [
        ({"max_step": 5}, "unknown setting 'max_step'"),
        ({"batch_size": "big"}, "batch_size must be int"),
        ("[1, 2]", "expected an object"),
    ],
)
def test_bad_config_files(tmp_path, content, message):
    cfg = tmp_path / "run.json"
    cfg.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(UserError, match=message):
        train_args.resolve(parse(["--config", str(cfg)]))


def test_run_folder_layout_and_refusal_to_overwrite(data_dir, tmp_path):
    out = tmp_path / "run"
    result = train(targs(data_dir, out, eval_every=3, keep_last=1))
    assert result.exit_code == 0 and result.step == 6
    assert os.readlink(out / "latest") == "checkpoints/step_000006"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000006"]  # keep_last=1
    assert (out / "best" / "model.safetensors").is_file() and (out / "loss.png").is_file()
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["training"]["max_steps"] == 6 and saved["model"]["hidden_size"] == 32
    assert saved["training"]["streams"] >= 1  # the resolved count, not 0 = auto
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [3, 6] and val[-1]["val_bpb"] > 0
    state = state_json(out / "latest")
    assert state["step"] == 6 and state["data"]["step"] == 6
    assert state["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in val))
    with pytest.raises(UserError, match="already holds a run"):
        train(targs(data_dir, out))


# -- never lose work --------------------------------------------------------------------------


def test_pipelined_loop_equals_one_step_at_a_time(data_dir, tmp_path):
    """The loop builds the next step while one computes (not across saves, evaluations or
    hooks); with dropout (per-step seeds) the weights and losses are bit-identical to running
    one step at a time (what a hook forces)."""
    kw = dict(model=dict(TINY, residual_dropout=0.1), max_steps=9, save_every=4, eval_every=3)
    seen = []
    piped = train(targs(data_dir, tmp_path / "a", **kw))
    single = train(targs(data_dir, tmp_path / "b", **kw), on_step=lambda t, loss: seen.append(loss))
    assert piped.step == single.step == 9 and piped.train_loss == single.train_loss == seen[-1]
    a, b = weights(tmp_path / "a" / "latest"), weights(tmp_path / "b" / "latest")
    assert all(np.array_equal(a[name], b[name]) for name in a)
    keep = ("step", "loss", "lr", "grad_norm", "tokens_seen", "val_loss")  # not timings
    logs = [
        [
            {k: v for k, v in json.loads(line).items() if k in keep}
            for line in (p / "metrics.jsonl").read_text().splitlines()
        ]
        for p in (tmp_path / "a", tmp_path / "b")
    ]
    assert logs[0] == logs[1] and any("lr" in r for r in logs[0])


def test_resume_is_exact(data_dir, tmp_path):
    dropout = dict(TINY, residual_dropout=0.1, embedding_dropout=0.1)
    kw = dict(model=dropout, max_steps=8, save_every=4, decay_steps=8)  # same schedule
    straight = train(targs(data_dir, tmp_path / "a", **kw))
    first = train(targs(data_dir, tmp_path / "b", **{**kw, "max_steps": 4}))
    resumed = train(targs(data_dir, tmp_path / "b", **kw, resume=True))
    assert first.step == 4 and resumed.step == straight.step == 8
    assert resumed.train_loss == straight.train_loss
    a, b = weights(tmp_path / "a" / "latest"), weights(tmp_path / "b" / "latest")
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6, err_msg=name)
    opt_a = mx.load(str(tmp_path / "a" / "latest" / "training_state" / "optimizer.safetensors"))
    opt_b = mx.load(str(tmp_path / "b" / "latest" / "training_state" / "optimizer.safetensors"))
    for name in opt_a:
        np.testing.assert_allclose(np.array(opt_a[name]), np.array(opt_b[name]), atol=1e-6)
    records = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))  # no duplicates


def test_nan_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"

    def poison(trainer, loss):
        if trainer.step == 4:  # after the step-3 checkpoint: weights turn to NaN
            w = trainer.model.layers[0].mlp.up_proj.weight
            trainer.model.layers[0].mlp.up_proj.weight = w * float("nan")

    with pytest.raises(TrainingDiverged, match="at step 5.*last good checkpoint: .*step_000003"):
        train(targs(data_dir, out, max_steps=10), on_step=poison)
    assert os.readlink(out / "latest") == "checkpoints/step_000003"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000003"]
    assert all(np.isfinite(w).all() for w in weights(out / "latest").values())
    assert state_json(out / "latest")["step"] == 3


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_and_exits(data_dir, tmp_path, sig, code):
    out = tmp_path / "run"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    cmd = [sys.executable, "-m", "mlx_transformer", "train", "--data", str(data_dir)]
    cmd += ["--out", str(out), "--max-steps", "100000", "--save-every", "0", "--no-progress"]
    cmd += ["--log-every", "1", "--batch-size", "4", *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err.decode()
    assert f"{sig.name}: saved step" in err.decode()
    assert not (out / "train.lock").exists()  # the run folder is free again
    state = state_json(out / "latest")
    assert state["step"] >= 3
    assert state["step"] == json.loads(metrics.read_text().splitlines()[-1])["step"]
    load_checkpoint(out / "latest")  # loadable


# -- data parallel ------------------------------------------------------------------------------


def launch_available() -> str | None:
    launcher = Path(sys.executable).with_name("mlx.launch")
    if not launcher.exists() or not mx.distributed.is_available():
        return None
    return str(launcher)


@pytest.mark.slow
@pytest.mark.skipif(launch_available() is None, reason="mlx.launch / mx.distributed unavailable")
def test_two_processes_equal_one_on_the_combined_batch(data_dir, tmp_path):
    out, steps, seed = tmp_path / "ddp", 3, 7
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    cmd = [launch_available(), "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2"]
    cmd += ["--python", sys.executable, "--", "-m", "mlx_transformer", "train"]
    cmd += ["--data", str(data_dir), "--out", str(out), "--max-steps", str(steps)]
    cmd += ["--batch-size", "2", "--seed", str(seed), "--no-progress", "--warmup-steps", "0"]
    cmd += ["--learning-rate", "1e-3", "--eval-batches", "2", "--grad-clip", "0.5", *flags]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"mlx.launch could not run here: {e}")
    if proc.returncode != 0 and "ring" in proc.stderr.lower() and not out.exists():
        pytest.skip(f"mlx.launch ring backend failed: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert state_json(out / "latest")["world_size"] == 2

    ds = load_dataset(data_dir)
    args = TrainingArgs(max_steps=steps, learning_rate=1e-3, warmup_steps=0, grad_clip=0.5)
    mx.random.seed(seed)
    model = Transformer(ModelConfig(vocab_size=ds.vocab_size, **TINY))
    model.train()
    stepper = Stepper(model, make_optimizer(args, model.trainable_parameters()), grad_clip=0.5)
    ranks = [PretrainBatches(ds, 2, 16, seed=seed, rank=r, world_size=2) for r in range(2)]
    for k in range(steps):
        mx.random.seed(step_seed(seed, 0, k))
        mx.eval(stepper.state, stepper.step(concat([to_mx(r.batch(k)) for r in ranks])))
    got = weights(out / "latest")
    for name, value in tree_flatten(model.parameters()):
        np.testing.assert_allclose(got[name], np.array(value), atol=1e-5, err_msg=name)


def test_cli_errors_are_one_line(data_dir, tmp_path, capsys):
    from mlx_transformer.cli import main

    assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no dataset at" in err
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
    assert main(["train", "--out", str(tmp_path / "o"), "--resume", "--data", str(data_dir)]) == 2
    assert "nothing to resume" in capsys.readouterr().err
