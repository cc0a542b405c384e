"""Training: the step's math, exact resume, signals, NaN handling, configuration, data parallel.

Tiny models (2 layers, width 32, context 16) on a ~50 KB corpus; the whole file runs in well
under a minute on two cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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

from mlx_transformer import train_args
from mlx_transformer.checkpoint import load_checkpoint
from mlx_transformer.config import ModelConfig
from mlx_transformer.data import PretrainBatches, load_dataset
from mlx_transformer.errors import UserError
from mlx_transformer.model import Transformer
from mlx_transformer.prepare import prepare
from mlx_transformer.train import TrainingDiverged, step_seed, to_mx, train
from mlx_transformer.train_args import TrainingArgs
from mlx_transformer.train_step import Stepper, loss_sum, lr_schedule, make_optimizer, shards

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    hidden_act="gelu_tanh",
)


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


# -- the step -------------------------------------------------------------------------------------


def tiny_model(vocab: int = 50, seed: int = 0, **overrides) -> Transformer:
    mx.random.seed(seed)
    model = Transformer(ModelConfig(vocab_size=vocab, **{**TINY, **overrides}))
    model.train()
    mx.eval(model.parameters())
    return model


def random_batch(rng, B: int, L: int = 16, vocab: int = 50) -> tuple:
    w = rng.integers(0, vocab, (B, L + 1)).astype(np.int32)
    return (mx.array(w[:, :-1]), mx.array(w[:, 1:]), None, None)


def test_overfits_one_batch():
    model = tiny_model()
    args = TrainingArgs(learning_rate=1e-2, warmup_steps=5, max_steps=150, weight_decay=0.0)
    stepper = Stepper(model, make_optimizer(args, model.trainable_parameters()), grad_clip=1.0)
    batch = random_batch(np.random.default_rng(0), 4)
    for _ in range(150):
        loss, _ = stepper.step(batch)
        mx.eval(stepper.state, loss)
    assert loss.item() < 0.05, loss.item()


def run_steps(model: Transformer, batches: list[list[tuple]], **stepper_kw) -> Transformer:
    """One optimizer step per entry of `batches`, accumulating over its micro-batches."""
    args = TrainingArgs(learning_rate=1e-2, warmup_steps=0, grad_clip=0.5)
    optimizer = make_optimizer(args, model.trainable_parameters())
    stepper = Stepper(model, optimizer, grad_clip=args.grad_clip, **stepper_kw)
    for micro in batches:
        acc = None
        for b in micro[:-1]:
            acc = stepper.accumulate(b, acc)
        out = stepper.step(micro[-1], acc)
        mx.eval(stepper.state, out)
    return model


def concat(batches: list[tuple]) -> tuple:
    return tuple(mx.concatenate(parts) for parts in zip(*(b[:2] for b in batches))) + (None, None)


def test_accumulation_equals_one_big_batch():
    rng = np.random.default_rng(1)
    steps = [[random_batch(rng, 2) for _ in range(4)] for _ in range(3)]
    accumulated = run_steps(tiny_model(), steps)
    big = run_steps(tiny_model(), [[concat(micro)] for micro in steps])
    for (name, a), (_, b) in zip(
        tree_flatten(accumulated.parameters()), tree_flatten(big.parameters())
    ):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5, err_msg=name)


@pytest.mark.parametrize("streams", [2, 3])
def test_streams_equal_one_stream(streams):
    """A micro-batch split across concurrent streams (3 rows over 2 or 3 streams: uneven shards,
    one row each) gives the whole batch's loss sum, token count and gradients, accumulation
    included. (Compared before AdamW, whose m/sqrt(v) turns the summation order's float32
    rounding into 1e-5 steps where a gradient is ~0.)"""
    rng = np.random.default_rng(4)
    micro = [random_batch(rng, 3) for _ in range(2)]
    results = []
    for n in (1, streams):
        model = tiny_model()
        args = TrainingArgs()
        stepper = Stepper(model, make_optimizer(args, model.trainable_parameters()), streams=n)
        acc = stepper.accumulate(micro[1], stepper.accumulate(micro[0]))
        mx.eval(acc)
        results.append(acc)
    (total1, count1, grads1), (total, count, grads) = results
    assert count.item() == count1.item() == 2 * 3 * 16
    assert total.item() == pytest.approx(total1.item(), rel=1e-6)
    # Sums over 96 tokens: float32 rounding is ~1e-6 of the largest gradient (and k_proj.bias's
    # exact-zero gradient is pure rounding).
    scale = max(np.abs(np.array(g)).max() for _, g in tree_flatten(grads1))
    for (name, a), (_, b) in zip(tree_flatten(grads1), tree_flatten(grads)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * scale, err_msg=name)


def test_shards_cover_the_batch_with_masks():
    batch = random_batch(np.random.default_rng(5), 5)
    mask = mx.ones(batch[1].shape)
    parts = shards(batch[:2] + (mask, None), 3)
    assert [p[0].shape[0] for p in parts] == [1, 2, 2]
    assert all(p[3] is None for p in parts)
    for i in range(3):
        joined = mx.concatenate([p[i] for p in parts])
        assert mx.array_equal(joined, (batch[:2] + (mask,))[i]).item()
    assert len(shards(batch, 8)) == 5  # never an empty shard


def test_loss_mask_counts_only_masked_tokens():
    model = tiny_model()
    model.eval()
    inputs, targets, _, _ = random_batch(np.random.default_rng(2), 2)
    mask = mx.zeros(targets.shape).at[:, 5:9].add(1.0)
    total, count = loss_sum(model, (inputs, targets, mask, None))
    full, _ = loss_sum(model, (inputs, targets, None, None))
    other = mx.array(np.where(np.array(mask) > 0, np.array(targets), 7).astype(np.int32))
    total_other, _ = loss_sum(model, (inputs, other, mask, None))
    assert count.item() == 8 and total.item() < full.item()
    assert total.item() == pytest.approx(total_other.item(), rel=1e-6)  # unmasked targets ignored


def test_lr_schedule_is_nanogpt():
    peak, floor, warmup, decay = 1e-3, 1e-4, 100, 2000
    schedule = lr_schedule(peak, floor, warmup, decay)

    def nanogpt(it):
        if it < warmup:
            return peak * (it + 1) / (warmup + 1)
        if it > decay:
            return floor
        ratio = (it - warmup) / (decay - warmup)
        return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - floor)

    for it in (0, 50, 99, 100, 101, 1000, 1999, 2000, 2500):
        assert schedule(mx.array(it)).item() == pytest.approx(nanogpt(it), rel=1e-5)


def test_weight_decay_spares_norms_and_biases():
    model = tiny_model()
    args = TrainingArgs(learning_rate=0.1, warmup_steps=0, weight_decay=0.5, min_learning_rate=0.1)
    optimizer = make_optimizer(args, model.trainable_parameters())
    before = dict(tree_flatten(model.parameters()))
    zero = {k: mx.zeros_like(v) for k, v in before.items()}
    from mlx.utils import tree_unflatten

    optimizer.update(model, tree_unflatten(list(zero.items())))
    after = dict(tree_flatten(model.parameters()))
    for name, p in before.items():
        ratio = np.array(after[name]) / np.where(np.array(p) == 0, 1, np.array(p))
        expected = 1 - 0.1 * 0.5 if p.ndim >= 2 else 1.0
        np.testing.assert_allclose(ratio[np.array(p) != 0], expected, rtol=1e-5, err_msg=name)


def test_bfloat16_keeps_float32_masters_and_learns():
    model = tiny_model()
    args = TrainingArgs(learning_rate=1e-2, warmup_steps=0)
    stepper = Stepper(
        model, make_optimizer(args, model.trainable_parameters()), "bfloat16", grad_clip=1.0
    )
    batch = random_batch(np.random.default_rng(3), 4)
    losses = []
    for _ in range(30):
        loss, _ = stepper.step(batch)
        mx.eval(stepper.state, loss)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}


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


def test_sigint_saves_and_exits_130(data_dir, tmp_path):
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
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert "SIGINT: saved step" in err.decode()
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


def test_fast_math_matches_mlx():
    from mlx_transformer import fastmath
    from mlx_transformer.model import gelu_tanh

    x = mx.array(np.linspace(-30, 30, 20001, dtype=np.float32))
    np.testing.assert_allclose(np.array(fastmath.exp(x)), np.array(mx.exp(x)), rtol=2e-7)
    np.testing.assert_allclose(np.array(fastmath.tanh(x)), np.array(mx.tanh(x)), atol=3e-7)
    np.testing.assert_allclose(np.array(fastmath.gelu_tanh(x)), np.array(gelu_tanh(x)), atol=2e-6)
    for fast, ref in ((fastmath.gelu_tanh, gelu_tanh), (fastmath.exp, mx.exp)):
        y = x / 10  # keep exp's gradient in a comparable range
        got = mx.grad(lambda v, f=fast: f(v).sum())(y)
        want = mx.grad(lambda v, f=ref: f(v).sum())(y)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=2e-5, atol=2e-6)
    logits = mx.array(np.random.default_rng(0).normal(0, 5, (3, 7, 50)).astype(np.float32))
    np.testing.assert_allclose(
        np.array(fastmath.logsumexp(logits)), np.array(mx.logsumexp(logits, axis=-1)), rtol=1e-6
    )


@pytest.mark.parametrize(
    "heads, kv_heads, mask", [(4, 4, "causal"), (4, 2, "padded"), (2, 1, None)]
)
def test_fast_attention_matches_mlx(heads, kv_heads, mask):
    from mlx_transformer import fastmath
    from mlx_transformer.model import attention_mask_4d

    rng = np.random.default_rng(0)
    B, L, hd = 2, 7, 8

    def arr(*shape):
        return mx.array(rng.normal(0, 1, shape).astype(np.float32))

    q, k, v, w = (
        arr(B, heads, L, hd),
        arr(B, kv_heads, L, hd),
        arr(B, kv_heads, L, hd),
        arr(B, heads, L, hd),
    )
    if mask == "padded":
        mask = attention_mask_4d(mx.array([[0, 0, 1, 1, 1, 1, 1], [1] * 7]), L, L)

    def loss(f):
        return lambda q, k, v: (f(q, k, v, scale=hd**-0.5, mask=mask) * w).sum()

    for got, want in zip(
        mx.value_and_grad(loss(fastmath.scaled_dot_product_attention), argnums=(0, 1, 2))(q, k, v),
        mx.value_and_grad(loss(mx.fast.scaled_dot_product_attention), argnums=(0, 1, 2))(q, k, v),
    ):
        for g, r in zip(*((got, want) if isinstance(got, tuple) else ([got], [want]))):
            np.testing.assert_allclose(np.array(g), np.array(r), atol=2e-5)


def test_buffer_cache_raises_the_cpu_limit_then_restores_it():
    from mlx_transformer.train_step import buffer_cache

    before = mx.set_cache_limit(32 << 20)
    try:
        with buffer_cache(256 << 20):
            assert mx.set_cache_limit(256 << 20) == 256 << 20  # (returns the limit in force)
        assert mx.set_cache_limit(32 << 20) == 32 << 20
    finally:
        mx.set_cache_limit(before)
