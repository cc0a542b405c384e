// Text generation in the browser: tokenizers.js for the text, onnxruntime-web
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
  config.special = new Set(config.special_ids ?? config.control_ids);
  config.bytes = new Set(config.byte_ids ?? []);
  config.known_ids ??= Infinity;
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

// Text of ids as our tokenizer decodes it (web.json "tokenizer" says which).
function decode(model, ids) {
  return model.config.tokenizer === "tokenizer.json" ? decodeHF(model, ids) : decodeSP(model, ids);
}

// As sentencepiece: control tokens are nothing, unk is " ⁇ " (the page's tokenizer.json
// marks neither as special, see web.py).
function decodeSP(model, ids) {
  const { control_ids, unk } = model.config;
  const parts = [[]];
  for (const id of ids) {
    if (id === unk) parts.push([]);
    else if (!control_ids.includes(id)) parts[parts.length - 1].push(id);
  }
  // tokenizers.js refuses to decode []
  return parts.map((p) => (p.length ? model.tokenizer.decode(p) : "")).join(" \u2047 ");
}

// As the `tokenizers` library (Rust) decodes a tokenizer.json: special tokens and ids past the
// vocabulary (padded embedding rows) are nothing, and a run of byte-fallback pieces that is not
// valid UTF-8 is one U+FFFD per byte (tokenizers.js's TextDecoder would merge them).
function decodeHF(model, ids) {
  const { known_ids, special, bytes } = model.config;
  const tokenizer = model.tokenizer;
  const kept = ids.filter((id) => id < known_ids && !special.has(id));
  if (!kept.length) return "";
  if (!bytes.size) {
    return tokenizer.decode(kept, { skip_special_tokens: true, clean_up_tokenization_spaces: false });
  }
  const tokens = [];
  let run = [];
  const flush = () => {
    const values = run.map((id) => parseInt(tokenizer.model.vocab[id].slice(3, 5), 16));
    try {
      new TextDecoder("utf-8", { fatal: true }).decode(Uint8Array.from(values));
      for (const id of run) tokens.push(tokenizer.model.vocab[id]);
    } catch {
      for (const _ of run) tokens.push("\uFFFD");
    }
    run = [];
  };
  for (const id of kept) {
    if (bytes.has(id)) { run.push(id); continue; }
    if (run.length) flush();
    tokens.push(tokenizer.model.vocab[id]);
  }
  if (run.length) flush();
  return tokenizer.decoder ? tokenizer.decoder(tokens) : tokens.join(" ");
}

// Whether the text of `tokens` may still change: it ends in U+FFFD (a character whose bytes
// are not all there yet) or in byte-fallback pieces (a run is decoded whole).
function unfinished(model, tokens) {
  const { special, bytes } = model.config;
  for (let k = tokens.length - 1; k >= 0; k--) {
    if (!special.has(tokens[k])) return bytes.has(tokens[k]);
  }
  return false;
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
  const { prompt_prefix, empty_prompt } = model.config;  // BOS where the tokenizer adds one
  const ids = [...prompt_prefix, ...model.tokenizer.encode(prompt, { add_special_tokens: false }).ids];
  if (ids.length) return ids;
  if (empty_prompt < 0) throw new Error("the prompt is empty and the tokenizer has no BOS or EOS");
  return [empty_prompt];  // an empty prompt starts a new document, as in training
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
    if (model.config.eos_ids.includes(token)) { finishReason = "eos"; break; }
    tokens.push(token);
    input = [token];
    // Decode everything so far; a trailing U+FFFD may be an unfinished UTF-8 sequence (one
    // stands for all of its bytes), a run of byte pieces may change when it ends: held back.
    const full = unfinished(model, tokens) ? "" : decode(model, tokens);
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
