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
WEB_PAGE = atomic.FolderKind(
    "web page",
    entries=(
        "index.html",
        "generate.js",
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
    if not (onnx_dir / TOKENIZER_FILE).is_file():
        raise UserError(
            f"{onnx_dir} has no {TOKENIZER_FILE}; the page needs the tokenizer: export a "
            "checkpoint that has one"
        )
    tokenizer = page_tokenizer_files(onnx_dir / TOKENIZER_FILE, io["context_length"])
    runtime = runtime_files()
    special = io.get("special_tokens") or {}
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
        "eos": special.get("eos", -1),
        # Control tokens decode to nothing and unk to " ⁇ ", as in sentencepiece.
        "control_ids": sorted({special[k] for k in ("bos", "eos", "pad") if k in special} - {-1}),
        "unk": special.get("unk", -1),
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
        (tmp / "index.html").write_text(INDEX_HTML)
        (tmp / "generate.js").write_text(GENERATE_JS)

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


# -- The page -------------------------------------------------------------------------------------

INDEX_HTML = """\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mlx-transformer</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; max-width: 52rem; margin: 2rem auto;
         padding: 0 1rem; }
  textarea { width: 100%; height: 6rem; font: 14px/1.4 ui-monospace, monospace; }
  #output { white-space: pre-wrap; font: 14px/1.4 ui-monospace, monospace; border: 1px solid #ccc;
            padding: .5rem; min-height: 8rem; }
  #output .prompt { color: #666; }
  label { margin-right: 1rem; }
  input[type=number] { width: 5rem; }
  #status { color: #666; margin: .5rem 0; }
</style>
</head>
<body>
<h1>mlx-transformer</h1>
<p id="status">loading…</p>
<textarea id="prompt" placeholder="Prompt (empty: start a new document)"></textarea>
<p>
  <label>max tokens <input id="max-tokens" type="number" min="1" value="100"></label>
  <label>temperature <input id="temp" type="number" min="0" step="0.1" value="0.8"></label>
  <label>top-k <input id="top-k" type="number" min="0" value="40"></label>
  <label>top-p <input id="top-p" type="number" min="0" max="1" step="0.05" value="1"></label>
  <label>seed <input id="seed" type="number" placeholder="random"></label>
</p>
<p><button id="generate" disabled>Generate</button> <button id="stop" disabled>Stop</button></p>
<div id="output"></div>
<script type="module" src="generate.js"></script>
</body>
</html>
"""

GENERATE_JS = r"""// Text generation in the browser: tokenizers.js for the text, onnxruntime-web
// for the graph.
// The graph's IO: input_ids, attention_mask, position_ids, past_key_values.{i}.key/value in;
// logits and present.{i}.key/value out (the KV cache, fed back at the next step).
import * as ort from "./ort/ort.webgpu.min.mjs";
import { Tokenizer } from "./tokenizers.mjs";

const $ = (id) => document.getElementById(id);
const status = (text) => { $("status").textContent = text; };

async function fetchJson(name) {
  const response = await fetch(name);
  if (!response.ok) throw new Error(`${name}: HTTP ${response.status}`);
  return response.json();
}

// WebGPU when the browser gives an adapter (or ?ep=wasm / ?ep=webgpu says which), else WASM.
async function chooseProvider() {
  const asked = new URLSearchParams(location.search).get("ep");
  if (asked === "wasm") return "wasm";
  let adapter = null;
  try { adapter = navigator.gpu ? await navigator.gpu.requestAdapter() : null; } catch { }
  if (asked === "webgpu" && !adapter) {
    throw new Error("?ep=webgpu, but this browser has no WebGPU adapter");
  }
  return adapter ? "webgpu" : "wasm";
}

function createSession(config, provider) {
  const options = {
    executionProviders: [provider],
    externalData: config.external_data.map((name) => ({ path: name, data: name })),
  };
  if (provider === "webgpu") {  // the KV cache stays on the GPU between steps
    options.preferredOutputLocation = {};
    for (let i = 0; i < config.num_hidden_layers; i++) {
      options.preferredOutputLocation[`present.${i}.key`] = "gpu-buffer";
      options.preferredOutputLocation[`present.${i}.value`] = "gpu-buffer";
    }
  }
  return ort.InferenceSession.create(config.model, options);
}

async function load() {
  const config = await fetchJson("web.json");
  const tokenizer = new Tokenizer(
    await fetchJson("tokenizer.json"), await fetchJson("tokenizer_config.json"));
  ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;
  if (!crossOriginIsolated) ort.env.wasm.numThreads = 1;  // threads need COOP/COEP headers
  let provider = await chooseProvider(), session = null, fallback = null;
  if (provider === "webgpu") {
    // One step before use: an adapter may lack what the graph needs (fp16 shaders, say).
    try {
      session = await createSession(config, provider);
      dispose((await forward({ config, session }, [0], 0, emptyCache(config))).past);
    } catch (e) {
      if (new URLSearchParams(location.search).get("ep") === "webgpu") throw e;
      await session?.release().catch(() => {});
      [provider, session, fallback] = ["wasm", null, `WebGPU failed (${e.message})`];
    }
  }
  session ??= await createSession(config, provider);
  return { config, tokenizer, session, provider, fallback };
}

// -- sampling: temperature, then top-k and top-p, then an inverse-CDF draw; argmax at temp 0.

function argmax(row) {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}

function randomSource(seed) {  // mulberry32 when seeded, for repeatable samples
  if (seed === null || seed === undefined || Number.isNaN(seed)) return Math.random;
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function sample(row, { temp, topK, topP }, random) {
  if (temp === 0) return argmax(row);
  const order = Array.from(row.keys()).sort((a, b) => row[b] - row[a]);
  let kept = topK > 0 ? order.slice(0, topK) : order;
  const top = row[kept[0]] / temp;
  let weights = kept.map((i) => Math.exp(row[i] / temp - top));
  if (topP > 0 && topP < 1) {  // the smallest set of most likely tokens with mass >= topP
    const total = weights.reduce((s, w) => s + w, 0);
    let before = 0, n = 0;
    while (n < weights.length && before < topP * total) before += weights[n++];
    kept = kept.slice(0, n);
    weights = weights.slice(0, n);
  }
  let u = random() * weights.reduce((s, w) => s + w, 0);
  for (let j = 0; j < kept.length; j++) {
    u -= weights[j];
    if (u < 0) return kept[j];
  }
  return kept[kept.length - 1];
}

// -- generation --------------------------------------------------------------------------------

// Text of ids as sentencepiece decodes it: control tokens are nothing, unk is " ⁇ " (the
// page's tokenizer.json marks neither as special, see web.py).
function decode(model, ids) {
  const { control_ids, unk } = model.config;
  const parts = [[]];
  for (const id of ids) {
    if (id === unk) parts.push([]);
    else if (!control_ids.includes(id)) parts[parts.length - 1].push(id);
  }
  // tokenizers.js refuses to decode []
  return parts.map((p) => (p.length ? model.tokenizer.decode(p) : "")).join(" \u2047 ");
}

const int64 = (values, dims) => new ort.Tensor("int64", BigInt64Array.from(values, BigInt), dims);

function emptyCache(config) {
  const past = {};
  const shape = [1, config.num_key_value_heads, 0, config.head_dim];
  for (let i = 0; i < config.num_hidden_layers; i++) {
    for (const part of ["key", "value"]) {
      past[`past_key_values.${i}.${part}`] = new ort.Tensor("float32", new Float32Array(0), shape);
    }
  }
  return past;
}

function dispose(tensors) {
  for (const tensor of Object.values(tensors)) tensor.dispose?.();
}

// One step: `input` (ids) after `total` cached positions. Returns the last position's logits
// and the new cache; the old cache is released.
async function forward(model, input, total, past) {
  const n = total + input.length;
  const out = await model.session.run({
    input_ids: int64(input, [1, input.length]),
    attention_mask: int64(new Array(n).fill(1), [1, n]),
    position_ids: int64(input.map((_, j) => total + j), [1, input.length]),
    ...past,
  });
  dispose(past);
  const V = out.logits.dims[2];
  const logits = out.logits.data.slice((input.length - 1) * V, input.length * V);
  out.logits.dispose?.();
  const present = {};
  for (let i = 0; i < model.config.num_hidden_layers; i++) {
    present[`past_key_values.${i}.key`] = out[`present.${i}.key`];
    present[`past_key_values.${i}.value`] = out[`present.${i}.value`];
  }
  return { logits, past: present };
}

function promptIds(model, prompt) {
  const ids = model.tokenizer.encode(prompt, { add_special_tokens: false }).ids;
  if (ids.length) return ids;
  if (model.config.eos < 0) throw new Error("the prompt is empty and the tokenizer has no EOS");
  return [model.config.eos];  // an empty prompt starts a new document, as in training
}

// Generate from `prompt` (text) or `ids`; onText(segment) gets the text as it becomes final.
// Returns { ids, tokens, text, finishReason }. Stops at EOS, maxTokens, the context, or stop().
async function generate(model, {
  prompt = "", ids = null, maxTokens = 100, temp = 0, topK = 0, topP = 1, seed = null,
  onText = () => {}, stopped = () => false,
}) {
  ids = (ids ?? promptIds(model, prompt)).map(Number);
  const context = model.config.context_length;
  if (ids.length >= context) {
    throw new Error(`the prompt has ${ids.length} tokens; the context holds ${context}`);
  }
  const steps = Math.min(maxTokens, context - ids.length);
  const random = randomSource(seed);
  const tokens = [];
  let text = "", finishReason = "length", input = ids, total = 0, past = emptyCache(model.config);
  for (let step = 0; step < steps; step++) {
    if (stopped()) { finishReason = "stopped"; break; }
    let logits;
    ({ logits, past } = await forward(model, input, total, past));
    total += input.length;
    const token = sample(logits, { temp, topK, topP }, random);
    if (token === model.config.eos) { finishReason = "eos"; break; }
    tokens.push(token);
    input = [token];
    // Decode everything so far; a trailing U+FFFD may be an unfinished UTF-8 sequence: held back.
    const full = decode(model, tokens);
    const shown = full.endsWith("\uFFFD") ? full.slice(0, -1) : full;
    if (shown.length > text.length && shown.startsWith(text)) {
      onText(shown.slice(text.length));
      text = shown;
    }
    await new Promise((resolve) => setTimeout(resolve, 0));  // let the page draw
  }
  if (finishReason === "length" && steps < maxTokens) finishReason = "context";
  dispose(past);
  const full = decode(model, tokens);
  if (full.length > text.length && full.startsWith(text)) onText(full.slice(text.length));
  return { ids, tokens, text: full, finishReason };
}

// The logits after `prompt` (or `ids`), for checking the page against other runtimes.
async function lastLogits(model, { prompt = "", ids = null }) {
  const { logits, past } = await forward(model, ids ?? promptIds(model, prompt), 0,
                                         emptyCache(model.config));
  dispose(past);
  return Array.from(logits);
}

// -- the page ----------------------------------------------------------------------------------

const ready = load();
window.mlxTransformer = {  // for scripts and tests: await ready, then generate(options)
  ready: ready.then((m) => ({ provider: m.provider, precision: m.config.precision,
                              fallback: m.fallback })),
  generate: async (options) => generate(await ready, options),
  logits: async (options) => lastLogits(await ready, options),
};

ready.then((model) => {
  const where = model.provider === "webgpu" ? "WebGPU" : "WASM";
  const why = model.fallback ? ` (${model.fallback})` : "";
  status(`ready: ${model.config.precision} model on ${where}${why}`);
  let stop = false;
  $("generate").disabled = false;
  $("stop").onclick = () => { stop = true; };
  $("generate").onclick = async () => {
    const number = (id) => Number($(id).value);
    const output = $("output");
    output.textContent = "";
    const shownPrompt = document.createElement("span");
    shownPrompt.className = "prompt";
    shownPrompt.textContent = $("prompt").value;
    output.append(shownPrompt);
    stop = false;
    $("generate").disabled = true;
    $("stop").disabled = false;
    const started = performance.now();
    try {
      const result = await generate(model, {
        prompt: $("prompt").value,
        maxTokens: number("max-tokens"),
        temp: Math.max(0, number("temp")),
        topK: number("top-k"),
        topP: number("top-p"),
        seed: $("seed").value === "" ? null : number("seed"),
        onText: (segment) => output.append(segment),
        stopped: () => stop,
      });
      const seconds = (performance.now() - started) / 1000;
      const n = result.tokens.length;
      status(`${n} tokens in ${seconds.toFixed(1)} s (${result.finishReason}), ${model.provider}`);
    } catch (e) {
      status(`error: ${e.message}`);
    } finally {
      $("generate").disabled = false;
      $("stop").disabled = true;
    }
  };
}, (e) => status(`error: ${e.message}`));
"""
