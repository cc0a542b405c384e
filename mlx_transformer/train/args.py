"""Training settings: one dataclass holds every default; CLI flags and config files map onto it.

Resolution, lowest to highest precedence:
  TrainingArgs defaults < the resumed run's run_config.json (with --resume)
  < a config file (--config, JSON; YAML when PyYAML is installed) < flags given on the command line.

Model architecture flags (--hidden-size, --num-hidden-layers, ...) are generated from ModelConfig's
fields and collected in `TrainingArgs.model`; they apply when training from scratch. Imports no
MLX, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..errors import UserError

PRECISIONS = ("float32", "bfloat16", "bfloat16-pure")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# ModelConfig fields that are not flags: the vocabulary comes from the tokenizer.
MODEL_FIELDS_NOT_FLAGS = ("vocab_size", "extra")
# Complete settings of known runs, shipped with the package: `--config NAME` (RECIPES/NAME.json).
RECIPES = Path(__file__).with_name("recipes")


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its CLI help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainingArgs:
    """Everything `train()` needs; the settings of known runs are config files in RECIPES."""

    # -- where -------------------------------------------------------------------------------
    data: str | None = _f(None, "dataset folder written by `mlx-transformer prepare`")
    out: str | None = _f(None, "run folder: checkpoints/, latest, best/, metrics.jsonl, loss.png")
    resume: bool = _f(False, "continue the run in --out from its latest checkpoint, exactly")
    init_from: str | None = _f(
        None, "start from this checkpoint (ours, or a Hugging Face GPT-2/Llama/Qwen folder)"
    )
    # -- model (from scratch: ModelConfig overrides; see the architecture flags) ----------------
    model: dict[str, Any] = _f({}, "ModelConfig fields for a model trained from scratch")
    precision: str = _f(
        "float32",
        "float32; bfloat16 = bf16 compute with float32 master weights and optimizer state; "
        "bfloat16-pure = bf16 weights and optimizer state (less memory, less accurate)",
        choices=PRECISIONS,
    )
    # -- batches and schedule ------------------------------------------------------------------
    max_steps: int = _f(2000, "optimizer steps to train for (in all, counting resumed ones)")
    batch_size: int = _f(12, "sequences per micro-batch, per process")
    context_length: int | None = _f(None, "tokens per sequence (default: the model's context)")
    grad_accumulation: int = _f(1, "micro-batches per optimizer step")
    learning_rate: float = _f(1e-3, "peak learning rate (fine-tuning wants ~1e-4 LoRA, ~3e-5 full)")
    min_learning_rate: float = _f(1e-4, "floor of the cosine decay")
    warmup_steps: int = _f(100, "linear warmup steps")
    decay_steps: int | None = _f(None, "steps until the floor is reached (default: max-steps)")
    weight_decay: float = _f(0.1, "decoupled weight decay, on matrices and embeddings only")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.99, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)")
    seed: int = _f(1337, "seed for initialisation, dropout and batch sampling")
    # -- evaluation, logging, checkpoints -----------------------------------------------------
    eval_every: int = _f(250, "evaluate every N steps (0 = only at the end)")
    eval_batches: int = _f(20, "validation batches per evaluation (0 = the whole val split)")
    log_every: int = _f(10, "append train metrics to metrics.jsonl every N steps")
    save_every: int = _f(500, "checkpoint every N steps (0 = only at the end)")
    keep_last: int = _f(3, "keep this many step checkpoints (best/ is kept apart)")
    compile: bool = _f(True, "compile the training step with mx.compile")
    streams: int = _f(
        0,
        "MLX streams each micro-batch is split across, run concurrently (0 = auto: one per CPU "
        "core, up to 4, on the CPU backend; 1 on a GPU)",
    )
    progress: bool = _f(True, "show a progress bar")
    # -- LoRA ----------------------------------------------------------------------------------
    lora: bool = _f(False, "train low-rank adapters on a frozen --init-from model")
    lora_rank: int = _f(8, "adapter rank r")
    lora_alpha: float = _f(16.0, "adapter scale alpha (the update is alpha/r * B A x)")
    lora_dropout: float = _f(0.0, "dropout on the adapter's input")
    lora_targets: list[str] = _f(["q_proj", "v_proj"], "projections to adapt", choices=LORA_TARGETS)
    lora_layers: int | None = _f(None, "adapt only the last N layers (default: all)")

    @property
    def total_decay_steps(self) -> int:
        return self.decay_steps if self.decay_steps is not None else self.max_steps

    def validate(self) -> None:
        """Raise UserError naming the first bad value."""
        positive = ("max_steps", "batch_size", "grad_accumulation", "keep_last", "lora_rank")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        nonneg = ("warmup_steps", "eval_every", "eval_batches", "log_every", "save_every")
        nonneg += ("streams",)
        for name in nonneg + ("weight_decay", "grad_clip", "min_learning_rate"):
            if getattr(self, name) < 0:
                raise UserError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise UserError(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.context_length is not None and self.context_length < 1:
            raise UserError(f"--context-length must be at least 1, got {self.context_length}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad:
            raise UserError(f"--lora-targets: {bad[0]} is not one of {', '.join(LORA_TARGETS)}")
        if self.lora and self.init_from is None and not self.resume:
            raise UserError("--lora needs a model to adapt: pass --init-from CKPT")
        if self.data is None:
            raise UserError("--data is required: a folder written by `mlx-transformer prepare`")
        if self.out is None:
            raise UserError("--out is required: the run folder")
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.model) - model_fields)
        if unknown:
            raise UserError(f"unknown model field {unknown[0]!r} (see ModelConfig)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- flags ---------------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _base_type(tp: Any) -> tuple[type, bool]:
    """(element type, is_list) of an annotation like `int | None` or `list[str]`."""
    if isinstance(tp, str):
        tp = eval(tp, {"Any": Any})  # annotations are strings under `from __future__ import`
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _add_field_flag(group: Any, f: dataclasses.Field, dest: str, help: str | None = None) -> None:
    tp, is_list = _base_type(f.type)
    kw: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help}
    if tp is bool:
        kw["action"] = argparse.BooleanOptionalAction
    else:
        kw["type"] = tp
        if is_list:
            kw["nargs"] = "+"
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        kw["metavar"] = {int: "N", float: "X"}.get(tp, f.name.split("_")[-1].upper())
    group.add_argument(f"--{_flag(f.name)}", **kw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every TrainingArgs field (defaults live in the dataclass, not here)."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="JSON (or YAML) file of TrainingArgs, or the name of a shipped recipe: "
        + ", ".join(sorted(p.stem for p in RECIPES.glob("*.json"))),
    )
    train = parser.add_argument_group("training (defaults: TrainingArgs)")
    for f in dataclasses.fields(TrainingArgs):
        if f.name == "model":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help = f.metadata["help"]
        _add_field_flag(train, f, f.name, help if "default" in help else f"{help} ({default})")
    arch = parser.add_argument_group("model architecture, from scratch (defaults: ModelConfig)")
    for f in dataclasses.fields(ModelConfig):
        if f.name in MODEL_FIELDS_NOT_FLAGS:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        _add_field_flag(arch, f, f"model.{f.name}", f"ModelConfig.{f.name} ({default})")


def flag_names() -> set[str]:
    """Every `--flag` that add_arguments defines (for the test that flags match the dataclass)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")}


# -- resolution ----------------------------------------------------------------------------------


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A dict of TrainingArgs fields (hyphens or underscores; "_..." keys are comments) from a
    JSON or YAML file, or a shipped recipe named without folder or suffix."""
    path = Path(path)
    if path.name == str(path) and not path.suffix and (RECIPES / f"{path}.json").is_file():
        path = RECIPES / f"{path}.json"
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"--config {path}: cannot be read ({e.strerror})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UserError(f"{path}: YAML needs PyYAML (pip install pyyaml); use JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({e})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected an object of training settings")
    # Keys starting with "_" are comments.
    return {k.replace("-", "_"): v for k, v in data.items() if not k.startswith("_")}


def merge(base: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """base updated with overrides (model dicts merged key by key); unknown keys are errors."""
    names = {f.name for f in dataclasses.fields(TrainingArgs)}
    out = dict(base)
    for key, value in overrides.items():
        if key not in names:
            raise UserError(f"{where}: unknown setting {key!r}")
        if key == "model":
            if not isinstance(value, dict):
                raise UserError(f"{where}: 'model' must be an object of ModelConfig fields")
            out["model"] = {**out.get("model", {}), **value}
        else:
            out[key] = value
    return out


def cli_overrides(namespace: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (unset flags are absent from the namespace)."""
    given = {k: v for k, v in vars(namespace).items() if not k.startswith("_")}
    given.pop("command", None)
    given.pop("config", None)
    model = {k.removeprefix("model."): given.pop(k) for k in list(given) if k.startswith("model.")}
    if model:
        given["model"] = model
    return given


def build_args(values: dict[str, Any]) -> TrainingArgs:
    """TrainingArgs from a dict of fields, with type errors reported as UserError."""
    try:
        args = TrainingArgs(**values)
    except TypeError as e:
        raise UserError(str(e)) from None
    for f in dataclasses.fields(TrainingArgs):
        value = getattr(args, f.name)
        tp, is_list = _base_type(f.type)
        if value is None or f.name == "model":
            continue
        items = value if is_list else [value]
        if is_list and not isinstance(value, list):
            raise UserError(f"{f.name} must be a list, got {value!r}")
        for item in items:
            ok = isinstance(item, tp) and not (tp is not bool and isinstance(item, bool))
            if tp is float and isinstance(item, int) and not isinstance(item, bool):
                ok = True
            if not ok:
                raise UserError(f"{f.name} must be {tp.__name__}, got {item!r}")
    return args


def read_saved_settings(path: Path) -> dict[str, Any]:
    """The "training" settings of a run's run_config.json; one line naming the file when it
    cannot be read, is cut short or is not ours."""
    fix = "restore it, or delete it and give the run's settings as flags or --config"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}; {fix}") from None
    except ValueError:  # cut short, or not UTF-8 / JSON at all
        raise UserError(f"{path} is not valid JSON (cut short?); {fix}") from None
    training = saved.get("training") if isinstance(saved, dict) else None
    if not isinstance(training, dict):
        raise UserError(f'{path} holds no "training" settings object; {fix}')
    return training


def resolve(namespace: argparse.Namespace) -> TrainingArgs:
    """TrainingArgs from parsed flags: defaults < saved run config < --config file < flags."""
    cli = cli_overrides(namespace)
    values: dict[str, Any] = {}
    file_values = read_config_file(namespace.config) if getattr(namespace, "config", None) else {}
    resume = cli.get("resume", file_values.get("resume", False))
    out = cli.get("out", file_values.get("out"))
    if resume and out is not None:
        saved = Path(out) / "run_config.json"
        if saved.exists():
            values = merge(values, read_saved_settings(saved), str(saved))
    values = merge(values, file_values, f"--config {getattr(namespace, 'config', '')}")
    values = merge(values, cli, "command line")
    return build_args(values)
