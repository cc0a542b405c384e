"""`mlx-transformer export CKPT OUT`: checkpoint folder → ONNX folder (`contract`), atomically."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from mlx_transformer import atomic
from mlx_transformer.checkpoint.hf_tokenizer import HF_TOKENIZER_FILES, export_tokenizer_files
from mlx_transformer.config import ModelConfig
from mlx_transformer.errors import UserError
from mlx_transformer.tokenizer_files import TOKENIZER_FILES, find_tokenizer, load_tokenizer

from .builder import FLAVOURS, build_model, fallbacks
from .contract import (
    CONFIG_FILE,
    EXTERNAL_DATA,
    FORMAT,
    IO_FILE,
    MODEL_CONFIG_FILE,
    MODEL_FILE,
    ONNX_FOLDER,
    external_data,
    io_json,
    model_file,
)
from .deploy import (
    GENAI_CONFIG_FILE,
    HF_CONFIG_FILE,
    README_FILE,
    genai_config,
    hf_config,
    hf_family,
    readme,
)
from .graph import OPSET
from .quantize import PRECISIONS, compare, to_fp16, to_int4, to_int8
from .weights import read_checkpoint

# Serialized protobufs are limited to 2 GB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
DEFAULT_EVAL_TEXT = Path(__file__).resolve().parent.parent / "mlx_transformer/data"
# What `export` may replace (with --overwrite): an earlier export, verify's reports included.
ONNX_EXPORT = atomic.FolderKind(
    "ONNX export",
    entries=(
        IO_FILE,
        ONNX_FOLDER,
        MODEL_FILE,
        EXTERNAL_DATA,
        CONFIG_FILE,
        MODEL_CONFIG_FILE,
        *TOKENIZER_FILES,
        GENAI_CONFIG_FILE,
        *HF_TOKENIZER_FILES,
        README_FILE,
        "verify.*",
        "verify-*",
    ),
    legacy=(IO_FILE, lambda io: io.get("format") == FORMAT),
)


def save(model: onnx.ModelProto, path: Path, external: bool) -> None:
    """Write the graph; external data in one file beside it (small tensors stay inline).

    Saving with external data rewrites `model` in place, so this is the last use of it.
    """
    if external:
        onnx.save_model(
            model,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=external_data(path.name),
            size_threshold=1024,  # 0 would also move int64 shape constants: ORT then fails
        )
    else:
        onnx.save_model(model, path)


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def eval_tokens_for(ckpt: Path, config: ModelConfig, eval_text: str | Path | None) -> tuple:
    """Token ids to measure precision loss on, and a description of where they came from."""
    tokenizer_path = find_tokenizer(ckpt)
    if tokenizer_path is not None:
        if eval_text is None:
            files = sorted(DEFAULT_EVAL_TEXT.glob("*.txt"))
            if files:
                text = files[0].read_text(encoding="utf-8")[-6000:]
                source = f"last 6000 characters of {files[0].name} (pass --eval-text for held-out)"
                ids = load_tokenizer(tokenizer_path).encode(text)
                return np.array(ids, np.int64), source
        else:
            text = Path(eval_text).read_text(encoding="utf-8")
            ids = load_tokenizer(tokenizer_path).encode(text)
            return np.array(ids, np.int64), str(eval_text)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, 512)
    return ids, "512 random token ids (no tokenizer: perplexity is not meaningful)"


def check_flavour(config: ModelConfig, flavour: str) -> None:
    """Refuse what a flavour's graph could not run. com.microsoft GroupQueryAttention (the ort
    flavour) rejects every head size that is not a multiple of 8 at run time, so such a graph
    would be written and then fail on its first call."""
    if flavour == "ort" and config.head_dim % 8:
        raise UserError(
            f"--flavour ort needs a head size that is a multiple of 8 (onnxruntime's "
            f"GroupQueryAttention); this model's is {config.head_dim}: use --flavour portable"
        )


def write_tokenizer_files(ckpt: Path, out: Path, config: ModelConfig) -> str:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json
    from the checkpoint's sentencepiece model, for the clients that read those (transformers,
    transformers.js, onnxruntime-genai's tokenizer). Returns what io.json says about them: a
    model those files cannot reproduce id for id (e.g. unigram) gets none, and the reason.
    An imported model's own tokenizer.json is copied as it is."""
    return export_tokenizer_files(ckpt, out, config.max_position_embeddings)


def special_tokens(ckpt: Path) -> dict | None:
    """The tokenizer's special ids, or None for a checkpoint without a tokenizer."""
    path = find_tokenizer(ckpt)
    return None if path is None else load_tokenizer(path).special_ids


def eos_ids(ckpt: Path) -> tuple[int, ...]:
    """Every id generation stops at (the tokenizer's eos_ids); () without a tokenizer."""
    path = find_tokenizer(ckpt)
    return () if path is None else load_tokenizer(path).eos_ids


def export_onnx(
    ckpt: str | Path,
    out: str | Path,
    flavour: str = "portable",
    precision: str | Sequence[str] = "fp32",
    eval_text: str | Path | None = None,
    eval_tokens: np.ndarray | None = None,
    measure: bool = True,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    overwrite: bool = False,
) -> dict:
    """Export a checkpoint folder to an ONNX folder, written atomically.

    Args:
        ckpt: checkpoint folder (config.json + model.safetensors [+ tokenizer.model]).
        out: the ONNX folder to write.
        flavour: "portable" (standard ONNX ops) or "ort" (onnxruntime fused ops).
        precision: "fp32", "fp16", "int8" or "int4", or several: one folder holds a graph per
            precision (`contract.model_file`); the first is the default that runtimes load.
        eval_text / eval_tokens: what to measure lower precisions on (default: see io.json).
        measure: measure lower precisions against fp32 (adds a few seconds).
        external_data_threshold: weights above this many bytes go to external data
            (onnx/model.onnx_data beside onnx/model.onnx).
        overwrite: replace an earlier ONNX export at `out` (nothing else is ever replaced).
    Returns:
        The io.json contents: "size_bytes" and, below fp32, "precision_report" of the default
        precision, and the same for each under "precisions".
    """
    if flavour not in FLAVOURS:
        raise UserError(f"--flavour must be one of {', '.join(FLAVOURS)}, got {flavour!r}")
    precisions = [precision] if isinstance(precision, str) else list(dict.fromkeys(precision))
    if not precisions:
        raise UserError("give at least one --precision")
    for p in precisions:
        if p not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {p!r}")
    ckpt, out = Path(ckpt), Path(out)
    if eval_text is not None and not Path(eval_text).is_file():
        raise UserError(f"--eval-text {eval_text}: not a file; give a text file to measure on")
    inputs = (ckpt, eval_text)
    # Refused outputs fail here, before the weights are read; write_folder checks again.
    atomic.check_output(out, ONNX_EXPORT, overwrite=overwrite, inputs=inputs)
    config, weights = read_checkpoint(ckpt)
    check_flavour(config, flavour)
    info = io_json(
        config,
        flavour=flavour,
        precision=precisions[0],
        checkpoint_dtype=weights.dtype,
        opset=OPSET,
        special_tokens=special_tokens(ckpt),
        notes=fallbacks(config, flavour),
    )
    eval_cache: list = []

    def measured_on() -> tuple:
        if not eval_cache:
            eval_cache.append(
                (np.asarray(eval_tokens), "given token ids")
                if eval_tokens is not None
                else eval_tokens_for(ckpt, config, eval_text)
            )
        return eval_cache[0]

    def write_precision(tmp: Path, precision: str) -> dict:
        """One precision's graph into tmp/onnx/; its io.json entry."""
        model = build_model(config, weights, flavour, head_copy=precision in ("int8", "int4"))
        external = weight_bytes(model) > external_data_threshold
        entry = {"model": model_file(precision)}
        target = tmp / entry["model"]
        if precision == "fp32":
            save(model, target, external)
        else:
            scratch, fp32 = tmp / ".fp32", model_file("fp32")
            (scratch / fp32).parent.mkdir(parents=True)
            save(model, scratch / fp32, external)
            if precision == "int8":
                to_int8(scratch / fp32, target, external)
            else:
                model = onnx.load(scratch / fp32)
                lowered = to_fp16(model) if precision == "fp16" else to_int4(model)
                save(lowered, target, external)
            if measure:
                tokens, source = measured_on()
                graph_io = {**info, "model": entry["model"]}
                report = compare(scratch, tmp, graph_io, tokens, reference_model=fp32)
                entry["precision_report"] = {"eval_source": source, **report}
                entry["precision_report"]["size_bytes_fp32"] = _graph_bytes(scratch / fp32)
            shutil.rmtree(scratch)
        files = _graph_files(target)
        entry["external_data"] = len(files) > 1
        entry["size_bytes"] = sum(f.stat().st_size for f in files)
        return entry

    def fill(tmp: Path) -> None:
        (tmp / ONNX_FOLDER).mkdir()
        entries = {p: write_precision(tmp, p) for p in precisions}
        default = entries[precisions[0]]
        for key in ("precision_report", "external_data", "size_bytes"):
            if key in default:
                info[key] = default[key]
        info["precisions"] = entries
        shutil.copyfile(ckpt / CONFIG_FILE, tmp / MODEL_CONFIG_FILE)
        special = info["special_tokens"]
        write_json(tmp / HF_CONFIG_FILE, hf_config(config, special))
        shared = flavour == "ort" and not config.windowed  # as OnnxModel's share_buffer
        genai = genai_config(config, info["model"], special, shared, eos_ids(ckpt))
        write_json(tmp / GENAI_CONFIG_FILE, genai)
        family, exact = hf_family(config)
        info["deploy"] = {
            "config.json": f"Hugging Face {family}"
            + ("" if exact else " (describes the graph's interface only: no Hugging Face "
               "family describes this model)"),
            "genai_config.json": f"onnxruntime-genai, type llama, {info['model']}",
            "tokenizer.json": write_tokenizer_files(ckpt, tmp, config),
        }  # fmt: skip
        write_json(tmp / IO_FILE, info)
        (tmp / README_FILE).write_text(readme(config, info), encoding="utf-8")

    atomic.write_folder(out, fill, ONNX_EXPORT, overwrite=overwrite, inputs=inputs)
    return info


def write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _graph_files(graph: Path) -> list[Path]:
    """A graph file and its external data (named after it, beside it)."""
    return [f for f in graph.parent.iterdir() if f.name.startswith(graph.name)]


def _graph_bytes(graph: Path) -> int:
    return sum(f.stat().st_size for f in _graph_files(graph))


# -- CLI ------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder")
    parser.add_argument("out", metavar="OUT", help="ONNX folder to write (a new or empty one)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export")
    parser.add_argument("--flavour", choices=FLAVOURS, default="portable")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        action="append",
        help="fp32 (default); repeat for one folder holding several (the first is the default)",
    )
    parser.add_argument("--eval-text", help="held-out text to measure lower precisions on")
    parser.add_argument("--no-measure", action="store_true", help="skip the precision report")


def run(args: argparse.Namespace) -> int:
    info = export_onnx(
        args.checkpoint,
        args.out,
        flavour=args.flavour,
        precision=args.precision or ["fp32"],
        eval_text=args.eval_text,
        measure=not args.no_measure,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.out}: {info['flavour']}")
    for precision, entry in info["precisions"].items():
        print(f"  {precision}: {entry['model']}, {entry['size_bytes']:,} bytes")
        report = entry.get("precision_report")
        if report:
            print(f"    vs fp32 on {report['eval_source']}:")
            for key in (
                "max_abs_logit_error", "argmax_agreement", "greedy_match", "perplexity_change"
            ):  # fmt: skip
                print(f"      {key}: {report[key]}")
            print(f"      size: {report['size_bytes_fp32']:,} → {entry['size_bytes']:,} bytes")
    for note in info["notes"]:
        print(f"  note: {note}")
    sys.stdout.flush()
    return 0
