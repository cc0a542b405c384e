"""Hugging Face GPT-2 / Llama / Qwen2 / Qwen3 checkpoints ⇄ ours (config.json + safetensors).

Import lets users fine-tune a pretrained model; export lets `transformers` and `mlx_lm` load ours
when its configuration is one of theirs. Parity with `transformers` is our correctness anchor.

    mlx-transformer convert --from-hf HF_DIR --out CKPT [--tokenizer tokenizer.model]
    mlx-transformer convert --to-hf CKPT --out HF_DIR [--for mlx-lm]

The Hugging Face folder holds config.json (with bos/eos/pad ids), model.safetensors, the
tokenizer files `AutoTokenizer` loads (hf_tokenizer.py: the same ids as ours), tokenizer.model
(for our own runtime and `--from-hf`), and a README.md saying which runtimes load it. GPT-2
tensors are named as openai's GPT-2 names them (no "transformer." prefix) and config.json has
`n_ctx`, which mlx-lm needs; mlx-lm's GPT-2 is fixed to a 4x-wide tanh-GELU MLP, so other GPT-2
shapes are refused with `--for mlx-lm` and flagged in the README otherwise.

Either writes a new or empty folder; `--overwrite` replaces only one it wrote before (a
checkpoint, or a Hugging Face folder), never a folder it did not write or an input.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .. import atomic
from ..config import MODEL_TYPE, ConfigError, ModelConfig
from ..errors import UserError
from ..model import Transformer
from ..tokenizer import SPECIAL_IDS, Tokenizer
from ..tokenizer_files import TOKENIZER_FILES, find_tokenizer
from .format import (  # a Hugging Face folder uses the same file names as ours
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    check_tensor_shapes,
    read_safetensors_header,
)
from .hf_config import family_of, hf_config
from .hf_families import CONFIG_READERS, UnsupportedField, _require
from .hf_readme import hf_readme
from .hf_tokenizer import HF_TOKENIZER_FILES, hf_folder_tokenizer, import_tokenizer
from .hf_window import LLAMA_LIKE, window_from_hf, window_mlx_lm_limits, window_to_hf
from .mlx_io import load_checkpoint, save_checkpoint

# The output folders `convert` and `fuse` write, and so may replace with --overwrite. A
# checkpoint written before markers is recognised by our model_type; one that holds
# training_state/ belongs to a training run and is never replaced. A Hugging Face folder has no
# schema of ours: only one with our marker is replaced.
CHECKPOINT = atomic.FolderKind(
    "checkpoint",
    entries=(CONFIG_FILE, WEIGHTS_FILE, *TOKENIZER_FILES),
    legacy=(CONFIG_FILE, lambda config: config.get("model_type") == MODEL_TYPE),
)
README_FILE = "README.md"
HF_MODEL = atomic.FolderKind(
    "Hugging Face model",
    entries=(CONFIG_FILE, WEIGHTS_FILE, *TOKENIZER_FILES, *HF_TOKENIZER_FILES, README_FILE),
)
# The runtimes `convert --to-hf --for` can promise; the folder always loads in transformers.
RUNTIMES = ("transformers", "mlx-lm")

# -- reading a Hugging Face folder -----------------------------------------------------------------


def read_hf_weights(hf_dir: Path) -> dict[str, mx.array]:
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    elif any(hf_dir.glob("*.bin")):
        raise UserError(
            f"{hf_dir}: only pickle (.bin) weights found; re-save the model with "
            "save_pretrained(safe_serialization=True) — pickle is never loaded here"
        )
    else:
        raise UserError(f"{hf_dir}: no model.safetensors found")
    weights = {}
    for name in files:
        read_safetensors_header(hf_dir / name)  # a clear error for truncated shards
        weights.update(mx.load(str(hf_dir / name)))
    return weights


def weights_from_gpt2(w: dict[str, mx.array], config: ModelConfig) -> dict[str, mx.array]:
    """GPT-2 stores Conv1D weights as (in, out) and Q/K/V fused: transpose and split."""
    w = {k.removeprefix("transformer."): v for k, v in w.items()}
    out = {
        "embed_tokens.weight": w.pop("wte.weight"),
        "embed_positions.weight": w.pop("wpe.weight"),
    }
    for i in range(config.num_hidden_layers):
        h, p = f"h.{i}", f"layers.{i}"
        for hf_norm, norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            out[f"{p}.{norm}.weight"] = w.pop(f"{h}.{hf_norm}.weight")
            out[f"{p}.{norm}.bias"] = w.pop(f"{h}.{hf_norm}.bias")
        qkv_w = mx.split(w.pop(f"{h}.attn.c_attn.weight"), 3, axis=1)
        qkv_b = mx.split(w.pop(f"{h}.attn.c_attn.bias"), 3)
        for name, wt, b in zip(("q_proj", "k_proj", "v_proj"), qkv_w, qkv_b):
            out[f"{p}.attn.{name}.weight"], out[f"{p}.attn.{name}.bias"] = wt.T, b
        for hf_name, name in (
            ("attn.c_proj", "attn.o_proj"),
            ("mlp.c_fc", "mlp.up_proj"),
            ("mlp.c_proj", "mlp.down_proj"),
        ):
            out[f"{p}.{name}.weight"] = w.pop(f"{h}.{hf_name}.weight").T
            out[f"{p}.{name}.bias"] = w.pop(f"{h}.{hf_name}.bias")
        w.pop(f"{h}.attn.bias", None), w.pop(f"{h}.attn.masked_bias", None)  # causal-mask buffers
    out["norm.weight"], out["norm.bias"] = w.pop("ln_f.weight"), w.pop("ln_f.bias")
    head = w.pop("lm_head.weight", None)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = head
    _require(not w, f"unexpected GPT-2 tensors {sorted(w)[:3]}")
    return out


# Our name <-> Llama's name, for the parts that differ (the rest is identical below the prefix).
LLAMA_RENAMES = [
    (".attn.", ".self_attn."),
    (".attn_norm.", ".input_layernorm."),
    (".mlp_norm.", ".post_attention_layernorm."),
]


def llama_name(ours: str) -> str:
    if ours == "lm_head.weight":
        return ours
    for a, b in LLAMA_RENAMES:
        ours = ours.replace(a, b)
    return "model." + ours


def weights_from_llama(w: dict[str, mx.array], config: ModelConfig) -> dict[str, mx.array]:
    w = {k: v for k, v in w.items() if "rotary_emb.inv_freq" not in k}  # a buffer, not a weight
    out = {}
    for ours in config.parameter_shapes():
        theirs = llama_name(ours)
        _require(theirs in w, f"missing Llama tensor {theirs}")
        out[ours] = w.pop(theirs)
    w.pop("lm_head.weight", None)  # a tied head may be saved too
    _require(not w, f"unexpected Llama tensors {sorted(w)[:3]}")
    return out


def import_hf(hf_dir: str | Path) -> Transformer:
    """Build our model from a Hugging Face GPT-2, Llama, Qwen2 or Qwen3 folder (config.json +
    safetensors)."""
    hf_dir = Path(hf_dir)
    try:
        hf = json.loads((hf_dir / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise UserError(
            f"{hf_dir}: no config.json (expected a Hugging Face model folder)"
        ) from None
    except OSError as e:  # e.g. a folder named config.json
        raise UserError(f"{hf_dir / CONFIG_FILE}: cannot be read ({e.strerror})") from None
    except (ValueError, RecursionError) as e:
        raise UserError(f"{hf_dir / CONFIG_FILE}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise UserError(f"{hf_dir / CONFIG_FILE}: a JSON {type(hf).__name__}, not an object")
    kind = hf.get("model_type")
    # Mistral and Ministral are Llama with a window (window_from_hf reads it, as for Qwen).
    reader = "llama" if kind in LLAMA_LIKE else kind
    if reader not in CONFIG_READERS:
        raise UserError(
            f"{hf_dir / CONFIG_FILE}: model_type {kind!r} is not supported "
            f"({', '.join((*CONFIG_READERS, *LLAMA_LIKE))} are)"
        )
    read_weights = weights_from_gpt2 if kind == "gpt2" else weights_from_llama
    try:
        config = CONFIG_READERS[reader](hf)
        window = window_from_hf(hf, kind, config.num_hidden_layers)
        config = ModelConfig.from_dict({**config.to_dict(), **window})
    except KeyError as e:
        raise UserError(f"{hf_dir / 'config.json'}: missing field {e}") from None
    except (ConfigError, UnsupportedField) as e:
        raise UserError(f"{hf_dir / 'config.json'}: {e}") from None
    try:
        weights = read_weights(read_hf_weights(hf_dir), config)
    except KeyError as e:
        raise UserError(f"{hf_dir}: missing tensor {e}") from None
    check_tensor_shapes(config, {k: v.shape for k, v in weights.items()}, str(hf_dir))
    model = Transformer(config)
    model.update(tree_unflatten(list(weights.items())))
    model.eval()
    mx.eval(model.parameters())
    return model


# -- writing a Hugging Face folder -----------------------------------------------------------------


def hf_family(config: ModelConfig) -> str:
    """The Hugging Face model_type that is exactly this configuration; else a UserError."""
    family = family_of(config)
    if family is None:
        raise UserError(
            "this configuration matches neither GPT-2 (learned positions, pre-norm "
            "LayerNorm, biases, tied, multi-head) nor Llama (rope half-split, pre-norm "
            "RMSNorm, SwiGLU; Qwen2: biases on q/k/v only; Qwen3: q/k norm); it can only be "
            "saved in our own format"
        )
    return family


def mlx_lm_limits(config: ModelConfig) -> list[str]:
    """What mlx-lm would load wrong in this model's Hugging Face folder (empty: nothing).
    Its GPT-2 builds the MLP as 4 x hidden_size with tanh GELU whatever config.json says; its
    Qwen2 takes the head size from hidden_size / heads, and its Qwen3 has no attention biases."""
    family, c = hf_family(config), config
    if family == "qwen2" and c.head_dim * c.num_attention_heads != c.hidden_size:
        return [f"its head size is {c.head_dim}, and mlx-lm's Qwen2 takes hidden_size / heads"]
    if family == "qwen3" and c.attention_bias:
        return ["it has attention biases, and mlx-lm's Qwen3 has none"]
    if family != "gpt2":
        return window_mlx_lm_limits(config)
    limits = []
    if config.intermediate_size != 4 * config.hidden_size:
        limits.append(
            f"its MLP is {config.intermediate_size} wide, and mlx-lm's GPT-2 is always "
            f"4 x hidden_size = {4 * config.hidden_size}"
        )
    if config.hidden_act != "gelu_tanh":
        limits.append(
            f"its activation is {config.hidden_act}, and mlx-lm's GPT-2 always uses tanh GELU"
        )
    return limits


def to_hf(
    model: Transformer, special_ids: dict[str, int] | None = None
) -> tuple[dict, dict[str, mx.array]]:
    """The Hugging Face config.json and tensors of our model. `special_ids` ({"bos": 1, ...},
    as `Tokenizer.special_ids`; default: the ids tokenizers trained here have) go into
    config.json as bos/eos/pad_token_id."""
    c, w = model.config, dict(tree_flatten(model.parameters()))
    family = hf_family(c)
    hf = hf_config(c, family, SPECIAL_IDS if special_ids is None else special_ids)
    hf = window_to_hf(hf, c)
    if family != "gpt2":  # Llama's tensor names, shared by Qwen2 and Qwen3
        return hf, {llama_name(k): v for k, v in w.items()}
    # Named as openai's GPT-2 checkpoint names them: transformers adds its "transformer."
    # prefix itself, and mlx-lm accepts only these names.
    out = {
        "wte.weight": w["embed_tokens.weight"],
        "wpe.weight": w["embed_positions.weight"],
        "ln_f.weight": w["norm.weight"],
        "ln_f.bias": w["norm.bias"],
    }
    for i in range(c.num_hidden_layers):
        h, p = f"h.{i}", f"layers.{i}"
        for hf_norm, norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            out[f"{h}.{hf_norm}.weight"] = w[f"{p}.{norm}.weight"]
            out[f"{h}.{hf_norm}.bias"] = w[f"{p}.{norm}.bias"]
        qkv = [f"{p}.attn.{n}" for n in ("q_proj", "k_proj", "v_proj")]
        out[f"{h}.attn.c_attn.weight"] = mx.concatenate([w[f"{n}.weight"].T for n in qkv], axis=1)
        out[f"{h}.attn.c_attn.bias"] = mx.concatenate([w[f"{n}.bias"] for n in qkv])
        for hf_name, name in (
            ("attn.c_proj", "attn.o_proj"),
            ("mlp.c_fc", "mlp.up_proj"),
            ("mlp.c_proj", "mlp.down_proj"),
        ):
            out[f"{h}.{hf_name}.weight"] = w[f"{p}.{name}.weight"].T
            out[f"{h}.{hf_name}.bias"] = w[f"{p}.{name}.bias"]
    return hf, out


def save_hf(
    model: Transformer,
    out_dir: str | Path,
    tokenizer_path: str | Path | None = None,
    *,
    overwrite: bool = False,
    inputs: tuple[str | Path | None, ...] = (),
    runtime: str = "transformers",
) -> Path:
    """Write `out_dir` in the Hugging Face layout (loadable by transformers and mlx_lm).

    With `tokenizer_path` (a sentencepiece model), the folder also holds the Hugging Face
    tokenizer files and generation_config.json. `runtime="mlx-lm"` refuses a model mlx-lm
    would load wrong (`mlx_lm_limits`); otherwise the README.md written into the folder says so.
    `out_dir` must be new or empty, or (with `overwrite`) a Hugging Face folder written here;
    `inputs` (with the tokenizer) are the paths it was made from, which it may not be or hold.

    Raises:
        UserError: the model is of neither family, mlx-lm was asked for and cannot load it, or
            the tokenizer does not fit the model or cannot be written exactly.
    """
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    limits = mlx_lm_limits(model.config)
    if runtime == "mlx-lm" and limits:
        raise UserError(
            f"mlx-lm cannot load this model correctly: {'; '.join(limits)}; convert without "
            "--for mlx-lm to use it with transformers"
        )
    tokenizer, write_tokenizer = None, None
    if tokenizer_path is not None:
        tokenizer, write_tokenizer = hf_folder_tokenizer(tokenizer_path, model.config)
    hf, weights = to_hf(model, tokenizer.special_ids if tokenizer is not None else None)
    dtype = next(iter(weights.values())).dtype
    hf["torch_dtype"] = {mx.float16: "float16", mx.bfloat16: "bfloat16"}.get(dtype, "float32")
    own_tokenizer = tokenizer is not None and not isinstance(tokenizer, Tokenizer)
    readme = hf_readme(model.config, hf, limits, tokenizer is not None, own_tokenizer)

    def fill(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
        # contiguous copies: safetensors stores row-major data, transposes are views
        mx.save_safetensors(
            str(tmp / WEIGHTS_FILE),
            {k: mx.contiguous(v) for k, v in weights.items()},
            metadata={"format": "pt"},
        )
        if write_tokenizer is not None:
            write_tokenizer(tmp)
        (tmp / README_FILE).write_text(readme, encoding="utf-8")

    inputs = (*inputs, tokenizer_path)
    return atomic.write_folder(out_dir, fill, HF_MODEL, overwrite=overwrite, inputs=inputs)


def load_pretrained(path: str | Path) -> tuple[Transformer, Path | None]:
    """A model to start from: our checkpoint folder, or a Hugging Face GPT-2/Llama/Qwen folder
    (told apart by config.json's model_type). Returns (model, its tokenizer.model or None)."""
    path = Path(path)
    try:
        kind = json.loads((path / CONFIG_FILE).read_text()).get("model_type", MODEL_TYPE)
    except (OSError, json.JSONDecodeError, AttributeError):
        kind = MODEL_TYPE  # load_checkpoint names the problem
    model = load_checkpoint(path) if kind == MODEL_TYPE else import_hf(path)
    tokenizer = path / TOKENIZER_FILE
    return model, tokenizer if tokenizer.is_file() else None


# -- CLI -------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--from-hf", metavar="HF_DIR", help="a Hugging Face GPT-2, Llama, Qwen2 or Qwen3 folder"
    )
    src.add_argument("--to-hf", metavar="CKPT", help="one of our checkpoints to write as HF")
    parser.add_argument("--out", required=True, help="the folder to write (a new or empty one)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a folder an earlier convert wrote"
    )
    parser.add_argument("--tokenizer", help="sentencepiece model to put in the output")
    parser.add_argument(
        "--for",
        dest="runtime",
        choices=RUNTIMES,
        help="with --to-hf: refuse a model this runtime cannot load correctly (mlx-lm's GPT-2 "
        "needs a 4x-wide tanh-GELU MLP); transformers loads every --to-hf output",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype to save (default: as read)",
    )


def run(args) -> int:
    source = args.from_hf or args.to_hf
    kind = CHECKPOINT if args.from_hf else HF_MODEL
    if args.from_hf and args.runtime:
        raise UserError("--for applies to --to-hf only; drop it with --from-hf")
    if args.tokenizer and not Path(args.tokenizer).is_file():
        raise UserError(f"{args.tokenizer}: not found; pass a tokenizer.model file")
    inputs = (source, args.tokenizer)
    # Refused outputs fail here, before the weights are read; the writer checks again.
    atomic.check_output(args.out, kind, overwrite=args.overwrite, inputs=inputs)
    if args.from_hf:
        model = import_hf(args.from_hf)
        tokenizer = import_tokenizer(args.tokenizer or args.from_hf, model.config.vocab_size)
        save_checkpoint(
            args.out,
            model,
            tokenizer_path=tokenizer,
            dtype=args.dtype,
            kind=CHECKPOINT,
            overwrite=args.overwrite,
            inputs=inputs,
        )
        family = model.config.extra["imported_from"]
    else:
        model = load_checkpoint(args.to_hf, dtype=args.dtype)
        family = hf_family(model.config)
        tokenizer = args.tokenizer or find_tokenizer(args.to_hf)
        save_hf(
            model,
            args.out,
            tokenizer,
            overwrite=args.overwrite,
            inputs=inputs,
            runtime=args.runtime or "transformers",
        )
    n = model.config.num_parameters()
    print(f"wrote {args.out} ({family}, {n / 1e6:.2f} M parameters)")
    return 0


__all__ = [
    "import_hf",
    "load_pretrained",
    "save_hf",
    "to_hf",
    "hf_family",
    "mlx_lm_limits",
    "CheckpointError",
    "CHECKPOINT",
    "HF_MODEL",
]
