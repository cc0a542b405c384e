"""The export folder's contract: what `export` writes and `onnx-generate` and `verify` read.

OUT/
  onnx/model.onnx   the decoder graph (`model_file`: model.onnx, model_fp16.onnx,
                    model_quantized.onnx or model_q4.onnx by precision, the names
                    transformers.js looks for); its inputs and outputs are `io_table`
  onnx/model.onnx_data  the weights, only when they pass ~1.8 GB (a protobuf stops at 2 GB)
  mlx_transformer_config.json   the checkpoint's config.json, byte for byte
  tokenizer.model   the checkpoint's tokenizer, when it has one
  io.json           `io_json`: the IO table, model dims, special tokens, flavour, precision,
                    notes; for lower precisions the measured cost against fp32
  config.json, genai_config.json, tokenizer.json, tokenizer_config.json,
  special_tokens_map.json, generation_config.json
                    for other runtimes (optimum, onnxruntime-genai, transformers.js): `deploy`

The graph's IO is the Hugging Face (optimum) layout. Batches are left-padded; the KV cache
goes out as `present.{i}.key/value` and comes back as `past_key_values.{i}.key/value`.
Of io.json the runtime needs only "model", "num_hidden_layers", "num_key_value_heads",
"head_dim" and "context_length" ("flavour" and "special_tokens" when present), so graphs from
other exporters run once they have such a file.

No onnx import here: the runtime reads this module, and running a model needs no onnx.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

# The checkpoint's names, re-exported so that every name of the folder is here.
from mlx_transformer.checkpoint.format import CONFIG_FILE as CONFIG_FILE
from mlx_transformer.checkpoint.format import TOKENIZER_FILE as TOKENIZER_FILE
from mlx_transformer.config import ModelConfig
from mlx_transformer.errors import UserError

# The checkpoint's own config.json; the export's config.json is Hugging Face's (`deploy`).
MODEL_CONFIG_FILE = "mlx_transformer_config.json"
MODEL_FILE = "model.onnx"  # an fp32 graph; earlier exports kept it beside io.json
EXTERNAL_DATA = "model.onnx.data"  # of earlier exports
IO_FILE = "io.json"
ONNX_FOLDER = "onnx"
# The graph's file name per precision: transformers.js's dtype suffixes (q8 = its default).
MODEL_FILES = {
    "fp32": "model.onnx",
    "fp16": "model_fp16.onnx",
    "int8": "model_quantized.onnx",
    "int4": "model_q4.onnx",
}


def model_file(precision: str) -> str:
    """The graph's path in the folder for a precision, e.g. "onnx/model_fp16.onnx"."""
    return f"{ONNX_FOLDER}/{MODEL_FILES[precision]}"


def external_data(model: str) -> str:
    """The external-data file name beside graph `model` (the `_data` suffix of optimum and
    transformers.js)."""
    return f"{Path(model).name}_data"


FORMAT = "mlx-transformer-onnx"
FORMAT_VERSION = 1

# Graph inputs and outputs; the KV cache names are `kv_pair(PAST | PRESENT, layer)`.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
# Optional scalar input (an initializer of value 0 that callers may override): n > 0 computes the
# logits of the last n positions only, 0 all of them (transformers' `logits_to_keep`; the
# name and scalar shape transformers.js feeds). A prompt's first token needs only the last.
LOGITS_TO_KEEP = "num_logits_to_keep"
PAST = "past_key_values"
PRESENT = "present"


def kv_pair(prefix: str, layer: int) -> tuple[str, str]:
    """(`{prefix}.{layer}.key`, `{prefix}.{layer}.value`), prefix PAST or PRESENT."""
    return f"{prefix}.{layer}.key", f"{prefix}.{layer}.value"


def kv_names(prefix: str, layers: int) -> list[str]:
    """Every layer's pair, in graph order (key then value, layer by layer)."""
    return [name for i in range(layers) for name in kv_pair(prefix, i)]


# Symbolic dims: batch_size, sequence_length (new tokens), past_sequence_length,
# total_sequence_length = past_sequence_length + sequence_length.


def io_table(config: ModelConfig) -> tuple[list[tuple], list[tuple]]:
    """(inputs, outputs), each a list of (name, dtype name, shape) in graph order.

    LOGITS_TO_KEEP comes last and has a default: clients that do not know it get every
    position's logits; with n > 0 the logits' sequence axis has min(n, sequence_length).
    """
    K, hd, V = config.num_key_value_heads, config.head_dim, config.vocab_size
    inputs = [
        (INPUT_IDS, "int64", ["batch_size", "sequence_length"]),
        (ATTENTION_MASK, "int64", ["batch_size", "total_sequence_length"]),
        (POSITION_IDS, "int64", ["batch_size", "sequence_length"]),
    ]
    outputs = [(LOGITS, "float32", ["batch_size", "sequence_length", V])]
    for i in range(config.num_hidden_layers):
        for past, present in zip(kv_pair(PAST, i), kv_pair(PRESENT, i)):
            inputs.append((past, "float32", ["batch_size", K, "past_sequence_length", hd]))
            outputs.append((present, "float32", ["batch_size", K, "total_sequence_length", hd]))
    inputs.append((LOGITS_TO_KEEP, "int64", []))
    return inputs, outputs


def feeds(input_ids, attention_mask, position_ids, past: Sequence, logits_to_keep=None) -> dict:
    """The graph's inputs by name; `past` holds two values per layer, in graph order;
    `logits_to_keep` (a 0-d int64 array) is left out when None (the graph's default: all)."""
    named = {
        INPUT_IDS: input_ids,
        ATTENTION_MASK: attention_mask,
        POSITION_IDS: position_ids,
        **dict(zip(kv_names(PAST, len(past) // 2), past)),
    }
    if logits_to_keep is not None:
        named[LOGITS_TO_KEEP] = logits_to_keep
    return named


def io_json(
    config: ModelConfig,
    *,
    flavour: str,
    precision: str,
    checkpoint_dtype: str,
    opset: int,
    special_tokens: dict | None,
    notes: list[str],
) -> dict:
    """The contents of io.json (the exporter adds sizes and the precision report)."""
    inputs, outputs = io_table(config)

    def table(rows):
        return [{"name": n, "dtype": t, "shape": s} for n, t, s in rows]

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_file(precision),
        "flavour": flavour,
        "precision": precision,
        "dtype": "float32",  # of the float inputs and outputs, in every precision
        "checkpoint_dtype": checkpoint_dtype,
        "opset": opset,
        "inputs": table(inputs),
        "outputs": table(outputs),
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "context_length": config.max_position_embeddings,
        **past_window(config, flavour),
        "special_tokens": special_tokens,
        "notes": notes,
    }


def past_window(config: ModelConfig, flavour: str) -> dict:
    """{"past_window": W - 1} when every layer slides through a window of W (with
    "attention_sinks": n when it has sinks): the runtime then keeps only that many past columns
    and the sinks' (the graph's mask counts positions within the mask, so cutting the columns no
    query sees changes nothing). Otherwise {}. "unbounded_positions": the graph computes rotary
    angles from position_ids (portable), so such a model also generates past context_length."""
    if not (config.all_windowed and config.sliding_window > 1):
        return {}
    out = {"past_window": config.sliding_window - 1}
    if config.attention_sinks:
        out["attention_sinks"] = config.attention_sinks
    if flavour == "portable" and config.position_encoding in ("rope", "none"):
        out["unbounded_positions"] = True
    return out


# What the runtime reads of io.json: these keys, each a positive integer.
RUNTIME_SIZES = ("num_hidden_layers", "num_key_value_heads", "head_dim", "context_length")
MAX_IO_BYTES = 1 << 24  # io.json is a few KB; the bound keeps a hostile one from filling memory


def read_io(onnx_dir: str | Path) -> dict:
    """io.json, checked for what the runtime needs (see the module docstring); errors say what
    is wrong in one line."""
    path = Path(onnx_dir) / IO_FILE

    def broken(what: str) -> UserError:
        return UserError(f"{path}: {what}; re-export the model")

    try:
        with open(path, "rb") as f:
            data = f.read(MAX_IO_BYTES + 1)
    except FileNotFoundError:
        raise UserError(
            f"{path}: not found; is {onnx_dir} a `mlx-transformer export` folder?"
        ) from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror})") from None
    if len(data) > MAX_IO_BYTES:
        raise broken(f"over {MAX_IO_BYTES:,} bytes, not an io.json")
    try:
        io = json.loads(data.decode("utf-8"))
    except ValueError as e:
        raise broken(f"not valid JSON ({e})") from None
    except RecursionError:
        raise broken("not valid JSON (nested too deeply)") from None
    if not isinstance(io, dict):
        raise broken(f"a JSON {type(io).__name__}, not an object")
    optional = [k for k in ("vocab_size", "past_window", "attention_sinks") if k in io]
    for key in (*RUNTIME_SIZES, *optional):
        value = io.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            what = "missing" if value is None else f"{value!r}, not a positive integer"
            raise broken(f"{key} is {what}")
    if not _inside(io.get("model", MODEL_FILE)):
        raise broken(f"model is {io.get('model')!r}, not a file name in the folder")
    precisions = io.get("precisions", {})
    if not (
        isinstance(precisions, dict)
        and all(isinstance(e, dict) and _inside(e.get("model")) for e in precisions.values())
    ):
        raise broken("precisions is not an object of {precision: {model: file in the folder}}")
    if not isinstance(io.get("flavour", ""), str):
        raise broken(f"flavour is {io['flavour']!r}, not a string")
    special = io.get("special_tokens")
    if special is not None and not (
        isinstance(special, dict)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in special.values())
    ):
        raise broken(f"special_tokens is {special!r}, not an object of token ids")
    return io


def _inside(model) -> bool:
    """Whether `model` is a relative path that stays inside the folder ("onnx/model.onnx")."""
    if not isinstance(model, str) or "\\" in model or Path(model).is_absolute():
        return False
    return all(part not in ("", ".", "..") for part in model.split("/"))


def select_precision(io: dict, precision: str | None, onnx_dir: str | Path = "") -> dict:
    """io.json as seen by a runtime loading one of the folder's precisions (None: its default):
    "model", "precision" and the measurements become that precision's."""
    if precision is None or precision == io.get("precision"):
        return io
    held = io.get("precisions") or {}
    if precision not in held:
        have = ", ".join(held) or str(io.get("precision"))
        raise UserError(
            f"{onnx_dir or 'the export'} holds {have}, not {precision}; export it with "
            f"--precision {precision} (repeat --precision for several in one folder)"
        )
    entry = held[precision]
    chosen = {k: v for k, v in io.items() if k not in ("precision_report",)}
    chosen.update(entry, precision=precision)
    return chosen
