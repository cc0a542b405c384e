"""`mlx-transformer web ONNX_DIR OUT`: an ONNX export → a static web page that generates text in
the browser, with nothing fetched from elsewhere at run time.

OUT/
  index.html, generate.js   the page: prompt, streaming output, temperature / top-k / top-p
  web.json                  what the page needs of io.json, and the model's file names
  model.onnx (+ its external data), tokenizer.json, tokenizer_config.json
  ort/                      onnxruntime-web (WASM, and WebGPU when the browser has an adapter)
  tokenizers.mjs            Hugging Face's tokenizers.js, which runs tokenizer.json in the page

Serve it with `python -m http.server -d OUT` and open http://localhost:8000/.
onnxruntime-web and tokenizers.js come from the npm registry, pinned (`NPM_PACKAGES`), installed
once with npm into a private cache (`web_home`, shared with scripts/install_web_clients.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mlx_transformer import atomic
from mlx_transformer.errors import UserError

from .contract import MODEL_FILE, POSITION_IDS, TOKENIZER_FILE, read_io, select_precision

# Pinned; scripts/install_web_clients.sh installs the same versions.
NPM_PACKAGES = {"onnxruntime-web": "1.30.0", "@huggingface/tokenizers": "0.2.0"}
# The files of onnxruntime-web the page loads: its WebGPU build runs the WASM provider too.
ORT_FILES = (
    "ort.webgpu.min.mjs",
    "ort-wasm-simd-threaded.asyncify.mjs",
    "ort-wasm-simd-threaded.asyncify.wasm",
)
TOKENIZERS_FILE = "tokenizers.mjs"
HF_FILES = ("tokenizer.json", "tokenizer_config.json")
WEB_CONFIG = "web.json"
# The page itself: plain HTML and JavaScript, shipped as package data beside this module.
PAGE_DIR = Path(__file__).with_name("web_page")
PAGE_FILES = ("index.html", "generate.js")
WEB_PAGE = atomic.FolderKind(
    "web page",
    entries=(
        *PAGE_FILES,
        WEB_CONFIG,
        "ort",
        TOKENIZERS_FILE,
        "model.onnx*",  # the graph and its external data
        "*.data",
        "*_data",
        *HF_FILES,
    ),
)


def web_home() -> Path:
    """The private npm folder: $MLX_TRANSFORMER_WEB_HOME, else ~/.cache/mlx-transformer/web."""
    home = os.environ.get("MLX_TRANSFORMER_WEB_HOME")
    return Path(home) if home else Path.home() / ".cache/mlx-transformer/web"


def _installed(home: Path) -> bool:
    for name, version in NPM_PACKAGES.items():
        try:
            manifest = json.loads((home / "node_modules" / name / "package.json").read_text())
        except (OSError, ValueError):
            return False
        if manifest.get("version") != version:
            return False
    return True


def runtime_files(home: Path | None = None) -> dict[str, Path]:
    """The page's third-party files by their name in OUT, installing them with npm if missing.

    Raises:
        UserError: npm is missing or cannot reach the registry (offline), in one line.
    """
    home = web_home() if home is None else home
    if not _installed(home):
        npm = shutil.which("npm")
        specs = [f"{name}@{version}" for name, version in NPM_PACKAGES.items()]
        if npm is None:
            raise UserError(
                f"the page needs {', '.join(specs)} from the npm registry, and npm is not "
                "installed; install Node.js and npm, or run scripts/install_web_clients.sh"
            )
        print(f"installing {' '.join(specs)} into {home} (once)", flush=True)
        try:
            home.mkdir(parents=True, exist_ok=True)
            if not (home / "package.json").exists():
                manifest = {"name": "mlx-transformer-web", "private": True}
                (home / "package.json").write_text(json.dumps(manifest) + "\n")
        except OSError as e:
            raise UserError(f"cannot write the npm cache {home} ({e.strerror})") from None
        env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}
        command = [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", *specs]
        done = subprocess.run(command, cwd=home, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not _installed(home):
            lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
            why = lines[-1] if lines else f"npm exited with {done.returncode}"
            raise UserError(
                f"could not install {' '.join(specs)} from the npm registry into {home} "
                f"(offline? {why}); connect and retry, or run scripts/install_web_clients.sh"
            )
    ort = home / "node_modules/onnxruntime-web/dist"
    files = {f"ort/{name}": ort / name for name in ORT_FILES}
    files[TOKENIZERS_FILE] = home / "node_modules/@huggingface/tokenizers/dist/tokenizers.min.mjs"
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise UserError(f"{missing[0]}: missing from the npm cache; delete {home} and retry")
    return files


def read_graph(model_path: Path) -> tuple[onnx.ModelProto, list[str]]:
    """The graph without its weights, and the files that hold its external data (names
    relative to the graph)."""
    try:
        model = onnx.load(model_path, load_external_data=False)
    except Exception as e:  # a cut or foreign file: onnx raises DecodeError and others
        raise UserError(f"{model_path}: not an ONNX model ({e}); re-export the model") from None
    names = set()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                names.add(entry.value)
    for name in names:
        if Path(name).name != name or not (model_path.parent / name).is_file():
            raise UserError(f"{model_path}: its external data {name!r} is not in the folder")
    return model, sorted(names)


def tabulate_positions(model: onnx.ModelProto, context: int) -> int:
    """Replace the run-time sin/cos of positions by tables looked up by position: WebGPU's
    sin/cos are far less exact than a CPU's (max logit error measured on Chromium's software
    adapter: 3e-4 to 6e-4 with RoPE or sinusoidal positions, 2e-6 with tables).

    Rewrites Sin/Cos(Mul(Unsqueeze(Cast(position_ids), axes), c)), c a 1-D constant, the form
    the exporter writes for both, into Unsqueeze(Gather(table, position_ids)), the table
    (context, len(c)) computed from the same float32 angles in float64. Returns how many.
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    constants = {t.name: t for t in graph.initializer if not t.external_data}

    def constant(name: str):
        return numpy_helper.to_array(constants[name]) if name in constants else None

    def angles(node):  # c, the positions' axes of Unsqueeze, and its output rank; or None
        mul = producer.get(node.input[0])
        if mul is None or mul.op_type != "Mul":
            return None
        for x, c in (mul.input, reversed(mul.input)):
            c, unsqueeze = constant(c), producer.get(x)
            if c is None or c.ndim != 1 or unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
                continue
            cast = producer.get(unsqueeze.input[0])
            axes = constant(unsqueeze.input[1]) if len(unsqueeze.input) > 1 else None
            if cast is None or cast.op_type != "Cast" or cast.input[0] != POSITION_IDS:
                continue
            if axes is None:
                continue
            rank = 2 + len(axes)  # position_ids is (batch, sequence)
            axes = sorted(int(a) % rank for a in axes)
            if axes[-1] == rank - 1:  # the last axis broadcasts against c
                return c.astype(np.float32), axes[:-1]
        return None

    nodes, count = [], 0
    for node in graph.node:
        found = angles(node) if node.op_type in ("Sin", "Cos") else None
        if found is None:
            nodes.append(node)
            continue
        c, axes = found
        angle = np.arange(context, dtype=np.float32)[:, None] * c[None, :]  # as the graph does
        table = (np.sin if node.op_type == "Sin" else np.cos)(angle.astype(np.float64))
        name = f"{node.output[0]}/table"
        graph.initializer.append(numpy_helper.from_array(table.astype(np.float32), name))
        looked_up = node.output[0] if not axes else f"{name}/gathered"
        nodes.append(helper.make_node("Gather", [name, POSITION_IDS], [looked_up], axis=0))
        if axes:
            graph.initializer.append(
                numpy_helper.from_array(np.array(axes, np.int64), name + "/axes")
            )
            nodes.append(helper.make_node("Unsqueeze", [looked_up, name + "/axes"], node.output))
        count += 1
    # Drop what computed the angles and is no longer used.
    while True:
        used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
        kept = [n for n in nodes if any(o in used for o in n.output)]
        if len(kept) == len(nodes):
            break
        nodes = kept
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def page_tokenizer_files(tokenizer_model: Path, context: int) -> dict[str, bytes]:
    """tokenizer.json and tokenizer_config.json for the page, from a sentencepiece model.

    tokenizers.js ignores `split_special_tokens`, so it would read a literal "<s>" in a prompt
    as the BOS token, where sentencepiece reads text. The page's copy therefore lists no special
    tokens as added tokens: they stay in the vocabulary (never produced from text: no merge
    makes them), and the page decodes their ids itself (web.json "control_ids" and "unk"), as
    sentencepiece does.
    """
    from mlx_transformer.checkpoint.hf_tokenizer import hf_tokenizer_files

    files = hf_tokenizer_files(tokenizer_model, model_max_length=context)
    spec = files["tokenizer.json"]
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["special"]]
    return {name: json.dumps(files[name], ensure_ascii=False).encode() for name in HF_FILES}


def page_tokenizer(onnx_dir: Path, context: int) -> tuple[dict[str, bytes], dict]:
    """The page's tokenizer files and what web.json says about decoding, for the export's
    tokenizer: a sentencepiece model (`page_tokenizer_files`), or an imported tokenizer.json,
    copied as it is with its tokenizer_config.json.

    web.json: "eos_ids" (generation stops at any), "prompt_prefix" (BOS where the tokenizer adds
    one), "empty_prompt" (the id an empty prompt starts from); for sentencepiece "control_ids"
    and "unk"; for tokenizer.json "special_ids" (decode to nothing), "byte_ids" (byte-fallback
    pieces: a run of them is held until whole) and "known_ids" (ids past it, a padded embedding
    row, decode to nothing), as `hf_tokenizers.HFTokenizer` decodes.
    """
    from mlx_transformer.tokenizer import Tokenizer
    from mlx_transformer.tokenizer_files import find_tokenizer, load_tokenizer

    path = find_tokenizer(onnx_dir)
    if path is None:
        raise UserError(
            f"{onnx_dir} has no {TOKENIZER_FILE} nor tokenizer.json; the page needs the "
            "tokenizer: export a checkpoint that has one"
        )
    tok = load_tokenizer(path)
    start = tok.bos_id if tok.bos_id >= 0 and not isinstance(tok, Tokenizer) else tok.eos_id
    decoding = {
        "tokenizer": path.name,
        "eos": tok.eos_id,
        "eos_ids": list(tok.eos_ids),
        "prompt_prefix": [tok.bos_id] if getattr(tok, "adds_bos", False) else [],
        "empty_prompt": start,
    }
    if isinstance(tok, Tokenizer):
        special = tok.special_ids
        # Control tokens decode to nothing and unk to " ⁇ ", as in sentencepiece.
        controls = {special[k] for k in ("bos", "eos", "pad")} - {-1}
        decoding.update(control_ids=sorted(controls), unk=tok.unk_id)
        return page_tokenizer_files(path, context), decoding
    decoding.update(
        special_ids=sorted(tok.special_token_ids()),
        byte_ids=sorted(tok.byte_piece_ids()),
        known_ids=tok.vocab_size,
    )
    files = {name: tok.files.get(name, b"{}") for name in HF_FILES}
    return files, decoding


def write_web(
    onnx_dir: str | Path, out: str | Path, precision: str | None = None, overwrite: bool = False
) -> dict:
    """Write the web page for the export at `onnx_dir` into `out` (atomically), with the graph
    of `precision` (default: the folder's first).

    Returns:
        web.json's contents.
    """
    onnx_dir, out = Path(onnx_dir), Path(out)
    atomic.check_output(out, WEB_PAGE, overwrite=overwrite, inputs=(onnx_dir,))
    io = select_precision(read_io(onnx_dir), precision, onnx_dir)
    model_path = onnx_dir / io.get("model", MODEL_FILE)
    if not model_path.is_file():
        raise UserError(f"{model_path}: not found; re-export the model")
    graph, external = read_graph(model_path)
    tables = tabulate_positions(graph, io["context_length"])
    tokenizer, decoding = page_tokenizer(onnx_dir, io["context_length"])
    runtime = runtime_files()
    config = {
        "model": MODEL_FILE,
        "external_data": external,
        "precision": io.get("precision", "fp32"),
        "position_tables": tables,
        "num_hidden_layers": io["num_hidden_layers"],
        "num_key_value_heads": io["num_key_value_heads"],
        "head_dim": io["head_dim"],
        "context_length": io["context_length"],
        "vocab_size": io.get("vocab_size"),
        **decoding,
    }

    def fill(tmp: Path) -> None:
        (tmp / "ort").mkdir()
        for name, source in runtime.items():
            shutil.copyfile(source, tmp / name)
        for name, content in tokenizer.items():
            (tmp / name).write_bytes(content)
        # The graph as is: its weights stay in the external data files copied beside it.
        (tmp / MODEL_FILE).write_bytes(graph.SerializeToString())
        for name in external:
            shutil.copyfile(model_path.parent / name, tmp / name)
        (tmp / WEB_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        for name in PAGE_FILES:
            shutil.copyfile(PAGE_DIR / name, tmp / name)

    atomic.write_folder(out, fill, WEB_PAGE, overwrite=overwrite, inputs=(onnx_dir,))
    return config


# -- CLI ------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="ONNX_DIR", help="folder written by `export`")
    parser.add_argument("out", metavar="OUT", help="web folder to write (a new or empty one)")
    parser.add_argument(
        "--precision", help="which of the folder's precisions the page runs (default: its first)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier web folder")


def run(args: argparse.Namespace) -> int:
    config = write_web(args.model, args.out, args.precision, overwrite=args.overwrite)
    print(f"wrote {args.out}: {config['precision']} model, onnxruntime-web (WASM; WebGPU if any)")
    print(f"  serve it: python -m http.server -d {args.out} 8000, then open http://localhost:8000/")
    sys.stdout.flush()
    return 0
