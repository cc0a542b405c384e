"""The JavaScript clients of an export, run for real: the web page (`mlx-transformer web`) in
headless Chromium driven by puppeteer-core against `python -m http.server` on 127.0.0.1, and
Node (onnxruntime-node, tokenizers.js, transformers.js). Each must give `generate --temp 0`'s
text token for token. scripts/test.sh installs the clients (scripts/install_web_clients.sh);
the tests skip, saying why, only where they are not installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hf_tokenizer_folders import byte_level_folder, metaspace_folder
from test_model import CONFIGS, random_model, tiny_config

from export.web import NPM_PACKAGES, page_tokenizer_files, web_home

REPO = Path(__file__).resolve().parent.parent
NODE = shutil.which("node")
CHROMIUM = shutil.which("chromium")
NODE_MODULES = web_home() / "node_modules"
INSTALL = "run scripts/install_web_clients.sh (scripts/test.sh does)"
PROMPT = "ROMEO:\nWhat light"
MAX_TOKENS = 32
SHAPES = {"gpt2": CONFIGS["gpt2"], "llama": CONFIGS["llama-gqa"], "paper": CONFIGS["paper"]}
QWEN2 = {**CONFIGS["llama-gqa"], "attention_bias": True, "attention_out_bias": False}
# Models whose tokenizer is an imported tokenizer.json: (shape, tokenizer folder builder).
HF_SHAPES = {
    "qwen2-byte-level": (QWEN2, byte_level_folder),  # GPT-2 / Qwen style BPE
    "llama-byte-fallback": (CONFIGS["llama-gqa"], metaspace_folder),  # Llama 2 / SmolLM style
}
# Greedy text of a random model is mostly invalid UTF-8 and byte pieces: the page's decoding of
# both, streamed, is compared with ours.
HF_PROMPT = "ROMEO:\nWhat light, é 😀"


def _need(*packages: str) -> None:
    if NODE is None:
        pytest.skip(f"node is not installed; {INSTALL}")
    for name in packages:
        if not (NODE_MODULES / name / "package.json").is_file():
            pytest.skip(f"{name} is not installed in {NODE_MODULES}; {INSTALL}")


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "mlx_transformer", *args], capture_output=True, text=True, cwd=REPO
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def node(script: str, *args: str, timeout: int = 240) -> dict:
    """Run a Node ES module (its imports resolve in the private node_modules); its last stdout
    line is JSON."""
    folder = web_home()
    path = folder / f".test-{os.getpid()}.mjs"  # beside node_modules, so imports resolve there
    path.write_text(script)
    try:
        done = subprocess.run(
            [NODE, str(path), *args], capture_output=True, text=True, timeout=timeout
        )
    finally:
        path.unlink()
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def export_random(
    root: Path, shape: str, tokenizer: Path, precision="fp32", external=False
) -> tuple[Path, Path]:
    """(checkpoint, ONNX export) of a random model of `shape` with `tokenizer`; its weights in
    external data with `external`."""
    from export.exporter import export_onnx
    from mlx_transformer.checkpoint.mlx_io import save_checkpoint
    from mlx_transformer.tokenizer import Tokenizer

    vocab = Tokenizer.load(tokenizer).vocab_size
    config = tiny_config(vocab_size=vocab, max_position_embeddings=64, **SHAPES[shape])
    ckpt = save_checkpoint(root / "ckpt", random_model(config), tokenizer_path=tokenizer)
    threshold = {"external_data_threshold": 0} if external else {}
    export_onnx(ckpt, root / "onnx", precision=precision, measure=False, **threshold)
    return ckpt, root / "onnx"


def export_hf_random(root: Path, shape: str, text: str) -> tuple[Path, Path]:
    """(checkpoint, ONNX export) of a random model of HF_SHAPES[`shape`] whose tokenizer is a
    tokenizer.json trained on `text`, with 24 padded embedding rows past its ids."""
    from export.exporter import export_onnx
    from mlx_transformer.checkpoint.mlx_io import save_checkpoint
    from mlx_transformer.hf_tokenizers import HFTokenizer

    dims, build = HF_SHAPES[shape]
    folder = build(root / "tokenizer", text, vocab_size=500)
    vocab = HFTokenizer.load(folder).vocab_size + 24
    config = tiny_config(vocab_size=vocab, max_position_embeddings=64, **dims)
    tokenizer = folder / "tokenizer.json"
    ckpt = save_checkpoint(root / "ckpt", random_model(config), tokenizer_path=tokenizer)
    export_onnx(ckpt, root / "onnx", measure=False)
    return ckpt, root / "onnx"


@pytest.fixture(scope="module", params=[*SHAPES, *HF_SHAPES])
def exported(
    request, tmp_path_factory, tiny_tokenizer_path, tiny_char_tokenizer_path, tiny_corpus_text
):
    """(checkpoint, ONNX export, its prompt, the text `generate --temp 0` writes) of a random
    model; BPE tokenizer, characters for the paper's shape, an imported tokenizer.json for
    HF_SHAPES; the Llama's weights in external data."""
    root = tmp_path_factory.mktemp(request.param)
    prompt = PROMPT
    if request.param in HF_SHAPES:
        ckpt, onnx_dir = export_hf_random(root, request.param, tiny_corpus_text)
        prompt = HF_PROMPT
    else:
        tokenizer = tiny_char_tokenizer_path if request.param == "paper" else tiny_tokenizer_path
        external = request.param == "llama"
        ckpt, onnx_dir = export_random(root, request.param, tokenizer, external=external)
        assert any((onnx_dir / "onnx").glob("*_data")) == external
    done = cli("generate", "--model", str(ckpt), "--prompt", prompt, "--temp", "0",
               "--max-tokens", str(MAX_TOKENS))  # fmt: skip
    assert done.stdout.endswith("\n")
    return ckpt, onnx_dir, prompt, done.stdout[:-1]


# -- the web page in headless Chromium ---------------------------------------------------------

PAGE_SCRIPT = r"""
import puppeteer from "puppeteer-core";
const [url, userDataDir, requests, gpuFlags] = process.argv.slice(2);
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM, userDataDir, headless: true,
  args: ["--headless", "--no-sandbox", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync",
         ...JSON.parse(gpuFlags)],
});
try {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("requestfailed", (r) => errors.push(`${r.url()}: ${r.failure()?.errorText}`));
  await page.goto(url, { waitUntil: "load" });
  await page.waitForFunction(() => window.mlxTransformer, { timeout: 60000 });
  const all = JSON.parse(requests);
  const results = await page.evaluate(async (requests) => {
    const ready = await window.mlxTransformer.ready;
    const results = [];
    for (const { logits, ...request } of requests) {
      if (logits) {
        results.push(await window.mlxTransformer.logits(request));
        continue;
      }
      const segments = [];
      const onText = (t) => segments.push(t);
      const out = await window.mlxTransformer.generate({ ...request, onText });
      results.push({ ...out, segments });
    }
    return { ...ready, results, status: document.getElementById("status").textContent };
  }, all.filter((r) => !r.ui));
  // What a user does: type a prompt, set greedy, click Generate, read the output.
  for (const { prompt, maxTokens } of all.filter((r) => r.ui)) {
    const set = (id, value) => page.$eval(id, (el, v) => { el.value = v; }, String(value));
    await set("#prompt", prompt);
    await set("#max-tokens", maxTokens);
    await set("#temp", 0);
    await page.click("#generate");
    await page.waitForFunction(
      () => / tokens in /.test(document.getElementById("status").textContent), { timeout: 120000 });
    results.results.push({
      output: await page.$eval("#output", (el) => el.textContent),
      status: await page.$eval("#status", (el) => el.textContent),
    });
  }
  console.log(JSON.stringify({ ...results, errors }));
} finally {
  await browser.close();
}
"""


def _serve(folder: Path) -> tuple[subprocess.Popen, str]:
    """`python -m http.server` on 127.0.0.1 at a free port, and its URL."""
    server = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "-d", str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = server.stdout.readline()
    port = re.search(r"port (\d+)", line)
    assert port, line
    return server, f"http://127.0.0.1:{port.group(1)}/"


def run_page(
    folder: Path, tmp_path: Path, requests: list[dict], query: str = "", gpu=("--disable-gpu",)
) -> dict:
    """Open the page (index.html`query`) in headless Chromium, with `gpu` flags; run each of
    `requests` through its generate(), or its logits() where the request says `logits`."""
    if CHROMIUM is None:
        pytest.skip(f"chromium is not installed; {INSTALL}")
    _need("puppeteer-core")
    server, url = _serve(folder)
    try:
        os.environ["CHROMIUM"] = CHROMIUM
        profile = tmp_path / "chromium-profile"
        return node(PAGE_SCRIPT, url + query, str(profile), json.dumps(requests), json.dumps(gpu))
    finally:
        server.terminate()
        server.wait()


@pytest.mark.slow
def test_web_page_greedy_matches_generate(exported, tmp_path):
    """The page in Chromium (WASM) gives `generate --temp 0`'s text, the ONNX runtime's ids and
    logits; sampling with a seed repeats, top-k 1 is greedy, no tokens is no text."""
    from export.runtime import OnnxGenerator

    ckpt, onnx_dir, prompt, want = exported
    web = tmp_path / "web"
    cli("web", str(onnx_dir), str(web))
    for name in ("index.html", "generate.js", "web.json", "model.onnx", "tokenizer.json"):
        assert (web / name).is_file(), name
    greedy = dict(prompt=prompt, maxTokens=MAX_TOKENS, temp=0)
    sampled = dict(prompt=prompt, maxTokens=MAX_TOKENS, temp=1.0, topK=20, seed=7)
    last = dict(prompt=prompt, logits=True)
    ui = dict(prompt=prompt, maxTokens=MAX_TOKENS, ui=True)
    top1, none = {**sampled, "topK": 1}, {**greedy, "maxTokens": 0}
    requests = [greedy, sampled, sampled, top1, none, last, ui]
    got = run_page(web, tmp_path, requests)
    assert got["errors"] == []
    assert got["provider"] == "wasm"  # --disable-gpu: no adapter
    page, first, again, top1, none, logits, typed = got["results"]
    assert len(page["tokens"]) == MAX_TOKENS and page["finishReason"] == "length"
    assert page["text"] == want == "".join(page["segments"])  # streamed in pieces
    assert len(page["segments"]) > 1
    assert typed["output"] == prompt + want, typed["status"]
    gen = OnnxGenerator(onnx_dir)
    assert page["ids"] == gen.encode(prompt)
    ids = gen.generate(prompt, MAX_TOKENS, stop_at_eos=False)[0].tokens
    assert page["tokens"] == ids
    if (onnx_dir / "tokenizer.json").is_file() and not (onnx_dir / "tokenizer.model").exists():
        for name in ("tokenizer.json", "tokenizer_config.json"):  # an imported one: as it is
            assert (web / name).read_bytes() == (onnx_dir / name).read_bytes()
        print(f"greedy text (streamed in {len(page['segments'])} segments): {want!r}")
    assert first["tokens"] == again["tokens"] != page["tokens"]
    assert top1["tokens"] == page["tokens"]
    assert (none["tokens"], none["text"]) == ([], "")
    np.testing.assert_allclose(logits, _onnx_logits(onnx_dir, prompt), atol=1e-5, rtol=1e-5)


def _onnx_logits(onnx_dir: Path, prompt: str = PROMPT) -> np.ndarray:
    """The last logits after `prompt` on onnxruntime's CPU provider."""
    from export.runtime import OnnxGenerator

    gen = OnnxGenerator(onnx_dir)
    ids = gen.encode(prompt)
    return gen.model(np.array([ids]), np.ones((1, len(ids)), np.int64))[0][0, -1]


@pytest.mark.slow
# RoPE, sinusoidal, and Qwen2 (biases on q/k/v) with a byte-level tokenizer.json
@pytest.mark.parametrize("exported", ["llama", "paper", "qwen2-byte-level"], indirect=True)
def test_web_page_on_webgpu(exported, tmp_path):
    """The page on Chromium's software WebGPU adapter (SwiftShader): greedy text and logits,
    with positions' sin/cos from tables (computed on this adapter: up to 6e-4 off)."""
    ckpt, onnx_dir, prompt, want = exported
    web = tmp_path / "web"
    cli("web", str(onnx_dir), str(web))
    requests = [dict(prompt=prompt, maxTokens=MAX_TOKENS, temp=0), dict(prompt=prompt, logits=True)]
    got = run_page(web, tmp_path, requests, "?ep=webgpu", gpu=("--enable-unsafe-webgpu",))
    if any("no WebGPU adapter" in e for e in got["errors"]):
        pytest.skip("this Chromium gives no WebGPU adapter")
    assert got["errors"] == [] and got["provider"] == "webgpu"
    page, logits = got["results"]
    error = np.abs(np.array(logits) - _onnx_logits(onnx_dir, prompt)).max()
    print(f"webgpu: max |logit error| {error:.2e}")
    assert page["text"] == want
    assert error < 1e-5  # sin/cos run on the GPU instead of tables: 3e-4 (RoPE)


@pytest.mark.slow
def test_web_page_falls_back_to_wasm(tmp_path, tiny_tokenizer_path):
    """The fp16 graph of an fp32 + fp16 export (`web --precision fp16`) on a WebGPU adapter
    without fp16 shaders (Chromium's software one): the page says so and generates on WASM,
    the ONNX runtime's greedy ids at that precision."""
    from export.runtime import OnnxGenerator

    _, onnx_dir = export_random(tmp_path, "llama", tiny_tokenizer_path, ["fp32", "fp16"])
    web = tmp_path / "web"
    cli("web", str(onnx_dir), str(web), "--precision", "fp16")
    assert json.loads((web / "web.json").read_text())["precision"] == "fp16"
    request = dict(prompt=PROMPT, maxTokens=MAX_TOKENS, temp=0)
    got = run_page(web, tmp_path, [request], gpu=("--enable-unsafe-webgpu",))
    assert got["errors"] == []
    if got["provider"] == "webgpu":
        pytest.skip("this WebGPU adapter runs fp16: nothing to fall back from")
    assert "WebGPU failed" in got["fallback"] and "WebGPU failed" in got["status"]
    gen = OnnxGenerator(onnx_dir, precision="fp16")
    ids = gen.generate(PROMPT, MAX_TOKENS, stop_at_eos=False)[0].tokens
    assert got["results"][0]["tokens"] == ids


# -- Node: tokenizers.js (the page's tokenizer) and transformers.js -----------------------------

TOKENIZER_SCRIPT = r"""
import fs from "node:fs";
import path from "node:path";
import { Tokenizer } from "@huggingface/tokenizers";
import { AutoTokenizer, env } from "@huggingface/transformers";
const [pageDir, exportDir, probesFile] = process.argv.slice(2);
const read = (name) => JSON.parse(fs.readFileSync(path.join(pageDir, name), "utf8"));
const page = new Tokenizer(read("tokenizer.json"), read("tokenizer_config.json"));
env.allowRemoteModels = false;
env.localModelPath = path.dirname(exportDir) + "/";
const auto = await AutoTokenizer.from_pretrained(path.basename(exportDir));
const result = JSON.parse(fs.readFileSync(probesFile, "utf8")).map((text) => {
  const ids = page.encode(text, { add_special_tokens: false }).ids;
  return {
    page: ids,
    page_text: ids.length ? page.decode(ids) : "",
    auto: auto.encode(text, { add_special_tokens: false }),
  };
});
console.log(JSON.stringify(result));
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_js_tokenizers_give_our_ids(kind, tmp_path, tiny_tokenizer_path, tiny_char_tokenizer_path):
    """The page's tokenizer (tokenizers.js on web's tokenizer.json) gives sentencepiece's ids on
    every probe, and transformers.js's AutoTokenizer on the export's files on every probe but
    literal special tokens: it ignores `split_special_tokens` and reads "<s>" as BOS."""
    from test_hf_tokenizer import PROBES

    from mlx_transformer.checkpoint.hf_tokenizer import write_hf_tokenizer_files
    from mlx_transformer.tokenizer import Tokenizer

    _need("@huggingface/tokenizers", "@huggingface/transformers")
    path = tiny_tokenizer_path if kind == "bpe" else tiny_char_tokenizer_path
    page, export = tmp_path / "page", tmp_path / "export"
    page.mkdir(), export.mkdir()
    for name, content in page_tokenizer_files(path, 64).items():
        (page / name).write_bytes(content)
    write_hf_tokenizer_files(path, export, model_max_length=64)
    (tmp_path / "probes.json").write_text(json.dumps(PROBES))
    got = node(TOKENIZER_SCRIPT, str(page), str(export), str(tmp_path / "probes.json"))
    ours = Tokenizer.load(path)
    specials = ("<s>", "</s>", "<unk>", "<pad>")
    for text, js in zip(PROBES, got, strict=True):
        want = ours.encode(text)
        assert js["page"] == want, text
        assert js["page_text"] == ours.decode(want), text
        if not any(s in text for s in specials):
            assert js["auto"] == want, text
        else:
            assert js["auto"] != want, f"transformers.js now splits special tokens: {text!r}"


def test_install_script_pins_the_pages_versions():
    script = (REPO / "scripts/install_web_clients.sh").read_text()
    for name, version in NPM_PACKAGES.items():
        assert f"{name}@{version}" in script


# -- transformers.js in Node, on the export folder as written ------------------------------------

TRANSFORMERS_JS_SCRIPT = r"""
import path from "node:path";
import { AutoModelForCausalLM, AutoTokenizer, env } from "@huggingface/transformers";
const [dir, prompt, maxTokens, addSpecial] = process.argv.slice(2);
env.allowRemoteModels = false;
env.localModelPath = path.dirname(dir) + "/";
const id = path.basename(dir);
const tokenizer = await AutoTokenizer.from_pretrained(id);
const model = await AutoModelForCausalLM.from_pretrained(id, { dtype: "fp32" });
const inputs = tokenizer(prompt, { add_special_tokens: addSpecial === "1" });
const n = inputs.input_ids.dims[1];
const { logits } = await model(inputs);
const V = logits.dims[2];
const last = Array.from(logits.data.subarray((n - 1) * V, n * V));
const max_new_tokens = Number(maxTokens);
const out = await model.generate({ ...inputs, max_new_tokens, do_sample: false });
const tokens = Array.from(out.data, Number).slice(n);
const text = tokenizer.decode(tokens, { skip_special_tokens: true });
const prompt_ids = Array.from(inputs.input_ids.data, Number);
console.log(JSON.stringify({ prompt_ids, last, tokens, text }));
"""


@pytest.mark.slow
def test_transformers_js_greedy_matches_generate(exported):
    """transformers.js (onnxruntime-node) loads the export folder as written, with its defaults:
    the prompt's ids, the last logits (fp32 tolerance) and the greedy text of `generate`."""
    import numpy as np

    from export.runtime import OnnxGenerator

    _need("@huggingface/transformers")
    _, onnx_dir, prompt, want = exported
    # An imported tokenizer.json adds BOS as transformers does (Llama 2's); ours adds none.
    imported = not (onnx_dir / "tokenizer.model").exists()
    got = node(TRANSFORMERS_JS_SCRIPT, str(onnx_dir), prompt, str(MAX_TOKENS), str(int(imported)))
    gen = OnnxGenerator(onnx_dir)
    ids = gen.encode(prompt)
    assert got["prompt_ids"] == ids
    logits, _ = gen.model(np.array([ids]), np.ones((1, len(ids)), np.int64))
    np.testing.assert_allclose(got["last"], logits[0, -1], atol=1e-5, rtol=1e-5)
    assert got["tokens"] == gen.generate_tokens([ids], MAX_TOKENS)[0].tokens
    if imported and "\ufffd" in want and gen.tokenizer.byte_fallback:
        # transformers.js decodes a run of byte pieces that is not UTF-8 with one U+FFFD per
        # invalid sequence, the tokenizers library with one per byte (a trained model's runs
        # are whole characters): the same ids, another text.
        return
    assert got["text"] == want
