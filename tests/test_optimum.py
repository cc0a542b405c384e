"""Hugging Face optimum loads the export folder as written: `ORTModelForCausalLM.from_pretrained`
on the folder with no arguments, greedy `generate` equal to `mlx-transformer generate --temp 0`
for 32 tokens, and the prompt's logits within the fp32 tolerance.

optimum-onnx (where optimum.onnxruntime lives) requires transformers < 4.58 and this project's
venv has transformers 5.x, so optimum lives in its own venv (scripts/install_optimum.sh, run by
scripts/test.sh) and runs here as a subprocess, as a user deploying with optimum would run it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_deploy import (
    ATOL,
    FLAVOURS,
    PROMPT,
    RTOL,
    SHAPES,
    TOKENS,
    deployed,
    mlx_greedy,
    mlx_logits,
)
from test_model import CONFIGS, random_model, tiny_config

from export import export_onnx
from mlx_transformer.checkpoint.mlx_io import save_checkpoint
from mlx_transformer.tokenizer import Tokenizer

OPTIMUM_HOME = Path(
    os.environ.get("MLX_TRANSFORMER_OPTIMUM_HOME", Path.home() / ".cache/mlx-transformer/optimum")
)
OPTIMUM_PYTHON = OPTIMUM_HOME / "venv" / "bin" / "python"
CASES = [(s, f) for s in SHAPES for f in FLAVOURS]

# Runs in optimum's venv: a list of {folder, load, prompt, tokens} on stdin, one JSON line of
# results on stdout. Each folder loads as a user would load it: fp32 with from_pretrained's
# defaults, another precision's file by naming it (`load`: subfolder and file_name).
CLIENT = """
import json, sys
import torch
from optimum.onnxruntime import ORTModelForCausalLM

results = []
for case in json.load(sys.stdin):
    model = ORTModelForCausalLM.from_pretrained(case["folder"], **case["load"])
    tokenizer = None
    if "text" in case:  # the prompt as text: the folder's tokenizer encodes it
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(case["folder"])
        case["prompt"] = tokenizer(case["text"]).input_ids
    ids = torch.tensor([case["prompt"]])
    mask = torch.ones_like(ids)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=case["tokens"], do_sample=False)
    logits = model(input_ids=ids, attention_mask=mask).logits[0]
    tokens = out[0, ids.shape[1]:].tolist()
    result = {"prompt": case["prompt"], "tokens": tokens, "logits": logits.tolist()}
    if tokenizer is not None:
        result["text"] = tokenizer.decode(tokens, skip_special_tokens=True)
    results.append(result)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def optimum_results(tiny_tokenizer_path, tmp_path_factory):
    """{(shape, flavour): (MLX model, tokenizer, prompt, optimum's result)}: one subprocess for
    all the exports, since importing torch and optimum dominates its time."""
    skip_without_optimum()
    cases, requests = {}, []
    for key in CASES:
        model, tokenizer, out = deployed(*key, tiny_tokenizer_path, tmp_path_factory)
        prompt = tokenizer.encode_prompt(PROMPT)
        cases[key] = (model, tokenizer, prompt)
        requests.append({"folder": str(out), "load": {}, "prompt": prompt, "tokens": TOKENS})
    results = run_optimum(requests)
    return {key: (*cases[key], result) for key, result in zip(CASES, results, strict=True)}


def skip_without_optimum():
    if not (OPTIMUM_HOME / "stamp").is_file():  # written last, once the venv works
        pytest.skip(
            f"optimum's venv is missing ({OPTIMUM_HOME}): scripts/test.sh installs it with "
            "scripts/install_optimum.sh, which needs PyPI (optimum-onnx requires "
            "transformers < 4.58, so it cannot share the project's venv)"
        )


def run_optimum(requests: list[dict]) -> list[dict]:
    """CLIENT in optimum's venv, in a clean environment: no project venv, no preloaded BLAS, no
    hub access."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PYTHONPATH")}
    env.pop("VIRTUAL_ENV", None)
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [str(OPTIMUM_PYTHON), "-c", CLIENT],
        input=json.dumps(requests),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def until_eos(tokens: list[int], eos_id: int) -> list[int]:
    """generate stops at EOS and includes it; ours leaves it out."""
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


@pytest.mark.slow
@pytest.mark.parametrize("key", CASES, ids=lambda k: "-".join(k))
def test_optimum_generate_matches_mlx(key, optimum_results):
    model, tokenizer, prompt, result = optimum_results[key]
    want = mlx_greedy(model, tokenizer, prompt)
    assert until_eos(result["tokens"], tokenizer.eos_id) == want
    assert len(want) == TOKENS  # the models do not stop early: all 32 tokens are compared
    np.testing.assert_allclose(
        np.array(result["logits"]), mlx_logits(model, prompt), atol=ATOL, rtol=RTOL
    )


@pytest.mark.slow
def test_optimum_runs_lower_precisions(tiny_tokenizer_path, tmp_path):
    """Each precision's file, named with subfolder/file_name, generates in optimum what our
    runtime (`onnx-generate`) generates from the same file; agreement with MLX is io.json's
    precision report (quantized tiny random models drift from fp32, as they do in ours)."""
    skip_without_optimum()
    from export.runtime import OnnxGenerator

    tokenizer = Tokenizer.load(tiny_tokenizer_path)
    wants, requests = [], []
    for shape in ("gpt2", "llama-gqa"):
        config = tiny_config(**CONFIGS[shape], vocab_size=tokenizer.vocab_size)
        ckpt = save_checkpoint(tmp_path / shape, random_model(config, seed=3), tiny_tokenizer_path)
        prompt = tokenizer.encode_prompt(PROMPT)
        for precision in ("fp16", "int8", "int4"):
            out = tmp_path / f"{shape}-{precision}"
            info = export_onnx(ckpt, out, flavour="ort", precision=precision)
            subfolder, file_name = info["model"].split("/")
            want = OnnxGenerator(out).generate_tokens([prompt], max_tokens=TOKENS)[0].tokens
            wants.append((shape, precision, want))
            load = {"subfolder": subfolder, "file_name": file_name}
            requests.append({"folder": str(out), "load": load, "prompt": prompt, "tokens": TOKENS})
    for (shape, precision, want), result in zip(wants, run_optimum(requests), strict=True):
        assert until_eos(result["tokens"], tokenizer.eos_id) == want, (shape, precision)


@pytest.mark.slow
def test_optimum_reads_an_imported_tokenizer(tmp_path, tiny_corpus_text):
    """Exports whose tokenizer is a model's own tokenizer.json (Qwen2 with byte-level BPE, Llama
    with byte-fallback BPE): transformers' AutoTokenizer on the folder gives our prompt ids,
    optimum's greedy tokens and their text are ours, the logits within fp32 tolerance."""
    from test_web import HF_PROMPT, HF_SHAPES, export_hf_random

    from mlx_transformer.checkpoint.mlx_io import load_checkpoint
    from mlx_transformer.tokenizer_files import load_tokenizer

    skip_without_optimum()
    cases, requests = [], []
    for shape in HF_SHAPES:
        ckpt, out = export_hf_random(tmp_path / shape, shape, tiny_corpus_text)
        model, tokenizer = load_checkpoint(ckpt), load_tokenizer(ckpt)
        prompt = tokenizer.encode_prompt(HF_PROMPT)
        cases.append((shape, model, tokenizer, prompt))
        requests.append({"folder": str(out), "load": {}, "text": HF_PROMPT, "tokens": TOKENS})
    for (shape, model, tokenizer, prompt), result in zip(cases, run_optimum(requests), strict=True):
        assert result["prompt"] == prompt, shape
        want = mlx_greedy(model, tokenizer, prompt)
        assert until_eos(result["tokens"], tokenizer.eos_id) == want, shape
        assert result["text"] == tokenizer.decode(want), shape
        print(f"{shape}: {len(prompt)} prompt ids, {len(want)} greedy tokens equal")
        logits = mlx_logits(model, prompt)
        np.testing.assert_allclose(np.array(result["logits"]), logits, atol=ATOL, rtol=RTOL)
