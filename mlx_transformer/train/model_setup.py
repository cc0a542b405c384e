"""Models for training: the run's model, whether fresh, fine-tuned from --init-from (our
checkpoint or a Hugging Face folder), wrapped with LoRA adapters, or resumed; cast to the run's
precision. `train.Trainer` builds its model here.

A model that comes with a tokenizer.model must have been trained with the one the dataset was
encoded with (the manifest's sha256), and its weights must be finite: either mistake would
otherwise train quietly into a useless model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..checkpoint.hf import load_pretrained
from ..checkpoint.mlx_io import load_checkpoint
from ..config import ModelConfig
from ..data.dataset import Dataset
from ..errors import UserError
from ..model import Transformer
from ..tokenizer_files import find_tokenizer, load_tokenizer
from .args import TrainingArgs
from .lora import apply_lora, load_adapters, read_adapter_config
from .step import cast_params

DROPOUT_FIELDS = ("embedding_dropout", "attention_dropout", "residual_dropout")


def with_dropout(model: Transformer, overrides: dict[str, Any]) -> Transformer:
    """The same weights in a model whose dropout rates are `overrides` (fine-tuning only)."""
    other = sorted(set(overrides) - set(DROPOUT_FIELDS))
    if other:
        raise UserError(
            f"--{other[0].replace('_', '-')} changes the architecture of the --init-from model; "
            "only the dropout rates can be set when fine-tuning"
        )
    if not overrides:
        return model
    config = dataclasses.replace(model.config, **overrides)
    config.validate()
    new = Transformer(config)
    new.update(model.parameters())
    return new


def build_model(
    args: TrainingArgs, dataset: Dataset, resume_from: Path | None
) -> tuple[Transformer, dict | None, Path]:
    """(model, LoRA config or None, tokenizer to save with checkpoints)."""
    source = resume_from if resume_from is not None else args.init_from
    if source is not None:
        check_same_tokenizer(Path(source), dataset, "--resume" if resume_from else "--init-from")
    lora_config = None
    if resume_from is not None and args.lora:
        lora_config = read_adapter_config(resume_from)
        model, _ = load_pretrained(lora_config["base_model"])
        load_adapters(model, resume_from)
    elif resume_from is not None:
        model = load_checkpoint(resume_from)
    elif args.init_from is not None:
        model, _ = load_pretrained(args.init_from)
        model = with_dropout(model, args.model)
        if args.lora:
            lora_config = apply_lora(
                model,
                args.lora_rank,
                args.lora_alpha,
                args.lora_dropout,
                args.lora_targets,
                args.lora_layers,
            )
            lora_config["base_model"] = str(Path(args.init_from).resolve())
    else:
        try:
            config = ModelConfig(**{"vocab_size": dataset.vocab_size, **args.model})
        except TypeError as e:
            raise UserError(f"model settings: {e}") from None
        model = Transformer(config)
    if dataset.vocab_size > model.config.vocab_size:
        raise UserError(
            f"the dataset's tokenizer has {dataset.vocab_size} tokens, the model only "
            f"{model.config.vocab_size}; prepare the data with the model's tokenizer "
            "(`mlx-transformer prepare --tokenizer CKPT/tokenizer.model`)"
        )
    if source is not None:
        check_finite_weights(model, Path(source))
    if args.precision == "bfloat16-pure":
        cast_params(model, mx.bfloat16, trainable_too=True)
    elif args.precision == "bfloat16":
        cast_params(model, mx.bfloat16, trainable_too=False)  # frozen LoRA base only
    mx.eval(model.parameters())
    return model, lora_config, dataset.tokenizer_path


def check_same_tokenizer(source: Path, dataset: Dataset, flag: str) -> None:
    """Refuse a checkpoint whose tokenizer.model is not the one `dataset` was encoded with:
    token ids would mean other words to its weights. A folder without one (a Hugging Face
    import, a bare model) is checked by vocabulary size only."""
    file = find_tokenizer(source)
    if file is None:
        return
    own = load_tokenizer(file).checksum
    expected = dataset.manifest["tokenizer"]["sha256"]
    if own != expected:
        raise UserError(
            f"{flag} {source} uses another tokenizer than the dataset {dataset.path} was "
            f"prepared with ({file.name} sha256 {own[:12]}, the manifest records "
            f"{expected[:12]}); prepare the data with `mlx-transformer prepare --tokenizer "
            f"{source}`"
        )


def check_finite_weights(model: Transformer, source: Path) -> None:
    """Refuse to train from weights holding NaN or infinity (e.g. saved after a divergence):
    the first step's loss would be NaN, and the learning rate would be blamed."""
    params = tree_flatten(model.parameters())
    finite = mx.stack([mx.isfinite(v).all() for _, v in params])
    mx.eval(finite)
    flags = finite.tolist()
    if not all(flags):
        name = params[flags.index(False)][0]
        raise UserError(
            f"{source}: the checkpoint has non-finite weights (NaN or infinity in {name}), so "
            "it cannot be trained from; use an earlier checkpoint"
        )
