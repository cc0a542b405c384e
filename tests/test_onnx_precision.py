"""fp16 / int8 / int4 exports stay within stated budgets on a small *trained* model.

Random weights make quantization look better or worse than it is (flat or spiky logits), so the
fixture trains a tiny Llama-style model for a few seconds: character level, on a fixed slice of
the embedded Tiny Shakespeare (text that no code change moves), in torch (MLX's Linux CPU path is
too slow for a test). The weights are written in the checkpoint format (config.json +
model.safetensors) and checked against tests/reference.py, then exported at each precision; the
cost is measured by `export_onnx` itself on held-out text.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import reference
from export import export_onnx
from mlx_transformer.config import ModelConfig

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "mlx_transformer/data/corpus/tinyshakespeare.txt"
TRAIN_CHARS, HELD_OUT_CHARS = 100_000, 4_000  # the first 100 kB to train on, the last 4 kB held out

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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint folder, held-out token ids) of a briefly trained char-level model."""
    from safetensors.numpy import save_file

    corpus = CORPUS.read_text(encoding="utf-8")
    train, held_out = corpus[:TRAIN_CHARS], corpus[-HELD_OUT_CHARS:]
    chars = sorted(set(train) | set(held_out))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in train])
    cfg = ModelConfig(
        vocab_size=len(chars),
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
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend (40 ms vs 1.6 s a step)
    params = {}
    for name, shape in cfg.parameter_shapes().items():
        init = torch.ones(shape) if "norm" in name else torch.randn(shape) * 0.02
        params[name] = torch.nn.Parameter(init)
    opt = torch.optim.AdamW(params.values(), lr=3e-3, weight_decay=0.0)
    T, losses = 64, []
    for _ in range(300):
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
    torch.set_num_threads(threads)
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:5])  # it learned something
    weights = {k: v.detach().numpy().astype(np.float32) for k, v in params.items()}
    ids = np.array([[index[c] for c in held_out[:40]]])
    with torch.no_grad():
        ours = torch_forward(cfg, params, torch.tensor(ids)).numpy()
    np.testing.assert_allclose(ours, reference.forward(cfg, weights, ids)[0], atol=1e-3, rtol=1e-3)
    ckpt = tmp_path_factory.mktemp("trained")
    cfg.save(ckpt / "config.json")
    save_file(weights, ckpt / "model.safetensors")
    return ckpt, np.array([index[c] for c in held_out])


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
