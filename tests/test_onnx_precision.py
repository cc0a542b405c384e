"""fp16 / int8 / int4 exports stay within stated budgets on a small *trained* model.

Random weights make quantization look better or worse than it is (flat or spiky logits), so the
fixture trains a tiny Llama-style model for a few seconds: character level, on a fixed slice of
the embedded Tiny Shakespeare (text that no code change moves), in torch (MLX's Linux CPU path is
too slow for a test). The weights are written in the checkpoint format (config.json +
model.safetensors) and checked against tests/reference.py, then exported at each precision; the
cost is measured by `export_onnx` itself on held-out text.

`verify` is held to its budgets here too (they were set from these measurements): the export of
this checkpoint passes at every precision, and so does nothing else: the same export checked
against a fine-tuned or a tampered checkpoint fails, through the API and the command line.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

import reference
from export import export_onnx
from mlx_transformer.cli import main
from mlx_transformer.config import ModelConfig
from mlx_transformer.verify import BUDGETS as VERIFY_BUDGETS
from mlx_transformer.verify import verify

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "mlx_transformer/data/corpus/tinyshakespeare.txt"
TRAIN_CHARS, HELD_OUT_CHARS = 100_000, 4_000  # the first 100 kB to train on, the last 4 kB held out
FINE_TUNE_END, FINE_TUNE_STEPS = 150_000, 100  # the next 50 kB, to fine-tune the trained model on
SCALED = "layers.1.mlp.down_proj.weight"  # the matrix that the "mlp x -3" checkpoint scales

# precision -> (max |logit error|, min next-token agreement, max relative perplexity increase,
#               max size as a fraction of fp32). Measured (ort flavour, 512 held-out tokens,
#               fp32 perplexity 10.3): fp16 0.025 / 100% / -0.006% / 0.57; int8 1.15 / 96.5% /
#               -0.6% / 0.36; int4 (LM head 8-bit) 1.87 / 96.1% / +0.3% / 0.24.
BUDGETS = {
    "fp16": (0.1, 0.99, 0.005, 0.6),
    "int8": (1.5, 0.90, 0.03, 0.45),
    "int4": (4.0, 0.80, 0.05, 0.35),
}


def torch_forward(cfg: ModelConfig, p: dict, ids):
    """The llama-style path of model.py in torch (rope halves, RMSNorm, SwiGLU, GQA)."""
    B, T = ids.shape
    H, K, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    inv = cfg.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv
    cos, sin = ang.cos(), ang.sin()

    def rope(x):
        a, b = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)

    def rms(x, name):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * p[name]

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = p["embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        n = f"layers.{i}"
        h = rms(x, f"{n}.attn_norm.weight")
        q = (h @ p[f"{n}.attn.q_proj.weight"].T).view(B, T, H, hd).transpose(1, 2)
        k = (h @ p[f"{n}.attn.k_proj.weight"].T).view(B, T, K, hd).transpose(1, 2)
        v = (h @ p[f"{n}.attn.v_proj.weight"].T).view(B, T, K, hd).transpose(1, 2)
        q, k = rope(q), rope(k).repeat_interleave(H // K, 1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        w = s.masked_fill(~causal, float("-inf")).softmax(-1)
        o = (w @ v.repeat_interleave(H // K, 1)).transpose(1, 2).reshape(B, T, H * hd)
        x = x + o @ p[f"{n}.attn.o_proj.weight"].T
        h = rms(x, f"{n}.mlp_norm.weight")
        g = h @ p[f"{n}.mlp.gate_proj.weight"].T
        u = h @ p[f"{n}.mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * u) @ p[f"{n}.mlp.down_proj.weight"].T
    return rms(x, "norm.weight") @ p["lm_head.weight"].T


CHAR_MODEL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    position_encoding="rope",
    norm_type="rmsnorm",
    hidden_act="swiglu",
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
)


def train(cfg: ModelConfig, params: dict, data, steps: int, lr=3e-3, only=None) -> list[float]:
    """`steps` AdamW steps on random windows of `data` (1-D token ids); returns the losses.
    `only`: the names of the parameters to train (default all)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend (40 ms vs 1.6 s a step)
    trained = [params[name] for name in (only or params)]
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    T, losses = 64, []
    try:
        for _ in range(steps):
            start = torch.randint(0, len(data) - T - 1, (24,))
            batch = torch.stack([data[s : s + T + 1] for s in start])
            logits = torch_forward(cfg, params, batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, cfg.vocab_size), batch[:, 1:].reshape(-1)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    return losses


def save(folder: Path, cfg: ModelConfig, weights: dict) -> Path:
    """A checkpoint folder (config.json + model.safetensors) of float32 numpy weights."""
    from safetensors.numpy import save_file

    cfg.save(folder / "config.json")
    save_file(weights, folder / "model.safetensors")
    return folder


def as_numpy(params: dict) -> dict:
    return {k: v.detach().numpy().astype(np.float32) for k, v in params.items()}


@pytest.fixture(scope="module")
def corpus():
    """(config, training token ids, held-out token ids, second slice for fine-tuning)."""
    text = CORPUS.read_text(encoding="utf-8")
    used = text[:FINE_TUNE_END], text[-HELD_OUT_CHARS:]
    index = {c: i for i, c in enumerate(sorted(set(used[0]) | set(used[1])))}
    train_ids, held_out = ([index[c] for c in part] for part in used)
    cfg = ModelConfig(vocab_size=len(index), **CHAR_MODEL)
    data = torch.tensor(train_ids)
    return cfg, data[:TRAIN_CHARS], np.array(held_out), data[TRAIN_CHARS:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """(checkpoint folder, held-out token ids) of a briefly trained char-level model."""
    cfg, data, held_out, _ = corpus
    torch.manual_seed(0)
    params = {}
    for name, shape in cfg.parameter_shapes().items():
        init = torch.ones(shape) if "norm" in name else torch.randn(shape) * 0.02
        params[name] = torch.nn.Parameter(init)
    losses = train(cfg, params, data, steps=300)
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:5])  # it learned something
    weights = as_numpy(params)
    ids = held_out[None, :40]
    with torch.no_grad():
        ours = torch_forward(cfg, params, torch.tensor(ids)).numpy()
    np.testing.assert_allclose(ours, reference.forward(cfg, weights, ids)[0], atol=1e-3, rtol=1e-3)
    return save(tmp_path_factory.mktemp("trained"), cfg, weights), held_out


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory, corpus, trained):
    """Checkpoints that are not the trained one: {"fine-tuned": its attention and MLP matrices
    trained further on the next slice of the corpus (as a fused LoRA changes them: embeddings,
    norms and head stay the trained ones), "mlp x -3": one MLP matrix scaled by -3}."""
    from safetensors.numpy import load_file

    cfg, _, _, fine_tune_data = corpus
    weights = load_file(trained[0] / "model.safetensors")
    torch.manual_seed(1)
    params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in weights.items()}
    matrices = [name for name in params if name.endswith("proj.weight")]
    train(cfg, params, fine_tune_data, steps=FINE_TUNE_STEPS, lr=1e-3, only=matrices)
    scaled = dict(weights, **{SCALED: weights[SCALED] * np.float32(-3)})
    return {
        "fine-tuned": save(tmp_path_factory.mktemp("fine_tuned"), cfg, as_numpy(params)),
        "mlp x -3": save(tmp_path_factory.mktemp("scaled"), cfg, scaled),
    }


@pytest.mark.slow
@pytest.mark.parametrize("precision", list(BUDGETS))
def test_precision_budget(precision, trained, tmp_path):
    ckpt, held_out = trained
    info = export_onnx(
        ckpt, tmp_path / precision, flavour="ort", precision=precision, eval_tokens=held_out
    )
    r = info["precision_report"]
    max_error, min_agreement, max_ppl, max_size = BUDGETS[precision]
    assert r["perplexity_fp32"] < 20  # trained: far below the vocabulary size (~90)
    assert r["max_abs_logit_error"] <= max_error, r
    assert r["argmax_agreement"] >= min_agreement, r
    assert r["perplexity_change"] <= max_ppl, r
    assert info["size_bytes"] <= max_size * r["size_bytes_fp32"], (info["size_bytes"], r)


# -- verify: the export of this checkpoint passes, the export checked against another fails -------

LOGIT_CHECKS = (
    "prefill, empty past",
    "prefill + decode == full",
    "varied batch/length",
    "maximum context",
    "greedy tokens",
)


@pytest.fixture(scope="module")
def exports(trained, tmp_path_factory):
    """(precision, flavour) -> the trained checkpoint's export, made on first use."""
    root, made = tmp_path_factory.mktemp("exports"), {}

    def get(precision: str, flavour: str) -> Path:
        if (precision, flavour) not in made:
            out = root / f"{precision}-{flavour}"
            export_onnx(trained[0], out, flavour=flavour, precision=precision, measure=False)
            made[precision, flavour] = out
        return made[precision, flavour]

    return get


def rows(report: dict) -> dict:
    return {
        r["check"]: r for r in report["checks"] if r["provider"] in ("-", "CPUExecutionProvider")
    }


def checked(ckpt: Path, export: Path, folder: Path) -> dict:
    """verify's report: through the API for portable exports, the command line for ort ones."""
    if "portable" in export.name:
        return verify(ckpt, export, providers=["cpu"], report=folder)
    code = main(["verify", str(ckpt), str(export), "--provider", "cpu", "--report", str(folder)])
    report = json.loads((folder / "verify.json").read_text())
    assert code == (0 if report["ok"] else 1)
    return report


@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["portable", "ort"])
@pytest.mark.parametrize("precision", list(VERIFY_BUDGETS))
def test_verify_passes_the_export_of_its_checkpoint(precision, flavour, trained, exports, tmp_path):
    report = checked(trained[0], exports(precision, flavour), tmp_path)
    budget = VERIFY_BUDGETS[precision]
    assert report["ok"], [r for r in report["checks"] if r["ok"] is False]
    assert report["budget"] == {k: v for k, v in asdict(budget).items() if v is not None}
    checks = rows(report)
    weights = checks["weights equal the checkpoint"]
    assert (weights["tensors"], weights["missing"], weights["outside_tolerance"]) == (21, 0, 0)
    for name in LOGIT_CHECKS:
        r = checks[name]
        assert r["ok"] is True, r
        if budget.max_logit_error is not None:  # within the budget by a margin
            assert r["logit_error"] <= budget.max_logit_error / 1.4, r
            assert r["argmax_agreement"] >= budget.min_agreement, r
    assert checks["greedy tokens"]["greedy_match"] == "64/64"
    md = (tmp_path / "verify.md").read_text()
    assert f"Budget ({precision} against the checkpoint): " in md and budget.measured in md


@pytest.mark.slow
@pytest.mark.parametrize("precision", list(VERIFY_BUDGETS))
@pytest.mark.parametrize("other", ["fine-tuned", "mlp x -3"])
def test_verify_fails_the_export_checked_against_another_checkpoint(
    precision, other, mismatched, exports, tmp_path
):
    """The weight check names the changed matrices, and every logit check fails on its own (by
    a margin), for both flavours, through the API and the command line."""
    budget = VERIFY_BUDGETS[precision]
    for flavour in ("portable", "ort"):
        report = checked(mismatched[other], exports(precision, flavour), tmp_path / flavour)
        assert report["ok"] is False
        assert "**FAIL**" in (tmp_path / flavour / "verify.md").read_text()
        checks = rows(report)
        weights = checks["weights equal the checkpoint"]
        assert weights["ok"] is False
        changed = 14 if other == "fine-tuned" else 1  # 7 matrices a layer, or SCALED alone
        assert weights["outside_tolerance"].startswith(f"{changed}: "), weights
        for name in LOGIT_CHECKS:
            r = checks[name]
            assert r["ok"] is False, r
            if budget.max_logit_error is not None:
                assert r["logit_error"] >= 1.4 * budget.max_logit_error, r
