"""LoRA: only adapters train, fusing is exact, and fine-tuning runs end to end (ours and HF)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import save_hf_model
from mlx.utils import tree_flatten

from mlx_transformer.checkpoint.mlx_io import load_checkpoint, save_checkpoint
from mlx_transformer.cli import main
from mlx_transformer.config import ModelConfig
from mlx_transformer.data.prepare import prepare
from mlx_transformer.errors import UserError
from mlx_transformer.model import Transformer
from mlx_transformer.train.args import TrainingArgs
from mlx_transformer.train.fuse import fuse
from mlx_transformer.train.lora import (
    ADAPTERS_FILE,
    LoRALinear,
    apply_lora,
    load_adapters,
    save_adapters,
)
from mlx_transformer.train.step import Stepper, make_optimizer
from mlx_transformer.train.trainer import train

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32)


def flat(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def tiny_model(vocab: int = 50, **overrides) -> Transformer:
    mx.random.seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab, **{**TINY, **overrides}))
    mx.eval(model.parameters())
    return model


def trained_adapters(model: Transformer, steps: int = 5, **lora) -> dict:
    """Wrap `model` with LoRA and take a few steps on random data."""
    config = apply_lora(model, **lora)
    model.train()
    args = TrainingArgs(learning_rate=1e-2, warmup_steps=0)
    stepper = Stepper(model, make_optimizer(args, model.trainable_parameters()), grad_clip=1.0)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        w = mx.array(rng.integers(0, 50, (4, 17)).astype(np.int32))
        mx.eval(stepper.state, stepper.step((w[:, :-1], w[:, 1:], None, None)))
    model.eval()
    return config


def test_only_adapters_change():
    model = tiny_model()
    before = flat(model)
    trained_adapters(model, rank=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"])
    after = flat(model)
    adapters = {k for k in after if k.endswith((".lora_a", ".lora_b"))}
    assert len(adapters) == 2 * 3 * 2  # a and b, three projections, two layers
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable == adapters
    for name, value in before.items():
        wrapped = name.replace("q_proj.", "q_proj.linear.").replace("v_proj.", "v_proj.linear.")
        wrapped = wrapped.replace("down_proj.", "down_proj.linear.")
        np.testing.assert_array_equal(after[wrapped], value, err_msg=name)
    assert all(np.abs(after[k]).max() > 0 for k in adapters if k.endswith("lora_b"))


def test_fused_checkpoint_matches_model_with_adapters(tmp_path):
    base = tiny_model()
    save_checkpoint(tmp_path / "base", base)
    model = load_checkpoint(tmp_path / "base")
    config = trained_adapters(model, rank=4, alpha=16.0, targets=["q_proj", "o_proj", "up_proj"])
    x = mx.array(np.random.default_rng(1).integers(0, 50, (2, 12)).astype(np.int32))
    expected = np.array(model(x))
    (tmp_path / "adapters").mkdir()
    save_adapters(tmp_path / "adapters", model, config)
    assert ADAPTERS_FILE in os.listdir(tmp_path / "adapters")

    fuse(tmp_path / "base", tmp_path / "adapters", tmp_path / "fused")
    fused = load_checkpoint(tmp_path / "fused")
    np.testing.assert_allclose(np.array(fused(x)), expected, atol=1e-5)
    assert not any(isinstance(m, LoRALinear) for _, m in fused.named_modules())
    again = load_checkpoint(tmp_path / "base")  # adapters reload into a fresh base exactly
    load_adapters(again, tmp_path / "adapters")
    np.testing.assert_array_equal(np.array(again(x)), expected)


def test_adapters_that_do_not_fit(tmp_path):
    model = tiny_model()
    config = trained_adapters(model, steps=1)
    save_adapters(tmp_path, model, config)
    with pytest.raises(UserError, match="shape"):
        load_adapters(tiny_model(hidden_size=64), tmp_path)


@pytest.fixture(scope="module")
def finetune_data(tmp_path_factory, tiny_tokenizer_path) -> Path:
    root = tmp_path_factory.mktemp("lora_data")
    examples = [
        {"prompt": f"Q{i}: who speaks?", "completion": " First Citizen." * (1 + i % 3)}
        for i in range(40)
    ]
    (root / "ft.jsonl").write_text("\n".join(json.dumps(e) for e in examples) + "\n")
    prepare([root / "ft.jsonl"], root / "ds", tokenizer=tiny_tokenizer_path)
    return root / "ds"


def test_lora_run_resume_and_fuse_cli(finetune_data, tmp_path, tiny_tokenizer_path):
    save_checkpoint(tmp_path / "base", tiny_model(vocab=400), tokenizer_path=tiny_tokenizer_path)
    args = dict(
        data=str(finetune_data),
        out=str(tmp_path / "run"),
        init_from=str(tmp_path / "base"),
        lora=True,
        lora_rank=4,
        batch_size=4,
        max_steps=4,
        decay_steps=6,
        save_every=2,
        eval_batches=1,
        progress=False,
    )
    first = train(TrainingArgs(**args))
    latest = tmp_path / "run" / "latest"
    assert sorted(os.listdir(latest)) == [
        "adapter_config.json",
        "adapters.safetensors",
        "tokenizer.model",
        "training_state",
    ]
    resumed = train(TrainingArgs(**{**args, "max_steps": 6, "resume": True}))
    assert (first.step, resumed.step) == (4, 6)
    assert main(["fuse", "--adapters", str(latest), "--out", str(tmp_path / "fused")]) == 0
    fused = load_checkpoint(tmp_path / "fused")  # base named by adapter_config.json
    assert (tmp_path / "fused" / "tokenizer.model").is_file()
    assert fused.config.vocab_size == 400


def test_full_finetune_from_hugging_face_gpt2(tmp_path, tiny_tokenizer_path, finetune_data):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=400, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    save_hf_model(lambda: transformers.GPT2LMHeadModel(config), tmp_path / "hf", o1_weights=False)
    result = train(
        TrainingArgs(
            data=str(finetune_data),
            out=str(tmp_path / "run"),
            init_from=str(tmp_path / "hf"),
            model={"residual_dropout": 0.1},
            batch_size=4,
            max_steps=3,
            eval_batches=1,
            progress=False,
        )
    )
    model = load_checkpoint(result.checkpoint)
    assert model.config.extra["imported_from"] == "gpt2"
    assert model.config.residual_dropout == 0.1
    with pytest.raises(UserError, match="only the dropout rates"):
        train(
            TrainingArgs(
                data=str(finetune_data),
                out=str(tmp_path / "run2"),
                init_from=str(tmp_path / "hf"),
                model={"hidden_size": 64},
                progress=False,
            )
        )
