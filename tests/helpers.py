"""What several test files need: a fingerprint of a folder tree, a user's things to protect, the
Llama-style model fields, the training-mode check against the float64 reference, tiny
Hugging Face models, and the preamble that makes `import mlx` fail in a subprocess."""

from __future__ import annotations

import contextlib
import hashlib
import os
import textwrap
from pathlib import Path


def fingerprint(*roots: Path, folders: bool = True) -> dict[str, str]:
    """sha256 of every file under `roots`, the target of every symlink and (with `folders`) every
    folder, by path: any change, loss or leftover (a temporary or new folder) shows."""
    out = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            key = str(path.relative_to(root)) if len(roots) == 1 else str(path)
            if path.is_symlink():
                out[key] = "-> " + os.readlink(path)
            elif path.is_dir():
                if folders:
                    out[key] = "folder"
            else:
                out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def add_user_files(world: Path) -> None:
    """What a user keeps beside our outputs, that no command may touch: notes, a web app whose
    manifest.json is not ours, a plain file."""
    (world / "notes").mkdir()
    (world / "notes/todo.md").write_text("my notes\n")
    (world / "webapp").mkdir()
    (world / "webapp/manifest.json").write_text('{"name": "my-web-app"}\n')
    (world / "webapp/index.html").write_text("<html></html>\n")
    (world / "file.txt").write_text("a plain file\n")


# A Llama-style model's fields (rotary, RMSNorm, SwiGLU, grouped key/value heads, no biases),
# for `tests.test_model.tiny_config(**LLAMA, ...)`.
LLAMA = dict(
    position_encoding="rope",
    norm_type="rmsnorm",
    hidden_act="swiglu",
    num_key_value_heads=2,
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
)


def assert_training_matches_reference(model, ids, mask, expected, rng, cpu_kernels=None) -> None:
    """In training mode `model` computes `expected` (the float64 reference's logits) on the real
    tokens, and its gradients of a random weighted sum of the logits equal autodiff through MLX's
    own kernels in inference mode. `cpu_kernels` None keeps the current choice."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx.utils import tree_flatten

    from mlx_transformer import ops

    weights = (
        mx.array(rng.normal(0, 1, expected.shape).astype(np.float32)) * mx.array(mask)[..., None]
    )

    def loss(m):
        return (m(mx.array(ids), attention_mask=mx.array(mask)) * weights).sum()

    kernels = contextlib.nullcontext() if cpu_kernels is None else ops.use_cpu_kernels(cpu_kernels)
    model.train()  # dropout is 0 in every test config
    try:
        with kernels:
            got = np.array(model(mx.array(ids), attention_mask=mx.array(mask)))
            train_grads = nn.value_and_grad(model, loss)(model)[1]
    finally:
        model.eval()
    with ops.use_cpu_kernels(False):
        eval_grads = nn.value_and_grad(model, loss)(model)[1]
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], expected[real], atol=2e-4, rtol=1e-4)
    scale = max(np.abs(np.array(g)).max() for _, g in tree_flatten(eval_grads))
    for (name, a), (_, b) in zip(tree_flatten(train_grads), tree_flatten(eval_grads)):
        np.testing.assert_allclose(
            np.array(a), np.array(b), rtol=1e-4, atol=1e-5 * scale, err_msg=name
        )


# Tiny Hugging Face models: a GPT-2 (learned positions, pre-LN LayerNorm, GELU-tanh, tied
# embeddings) and a Llama (rotary, RMSNorm, SwiGLU, grouped-query attention, untied head).
HF_GPT2 = dict(
    vocab_size=97,
    n_embd=48,
    n_layer=2,
    n_head=4,
    n_positions=64,
    resid_pdrop=0,
    embd_pdrop=0,
    attn_pdrop=0,
)
HF_LLAMA = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def save_hf_model(make, folder: Path, o1_weights: bool = True):
    """Seed torch, build `make()` in eval mode, (with `o1_weights`) draw O(1) random weights so
    that differences are not hidden by tiny activations, save it to `folder` as safetensors and
    return it."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    model = make().eval()
    if o1_weights:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.5 / np.sqrt(p.shape[-1]) if p.ndim == 2 else 0.1).add_(
                    1.0 if p.ndim == 1 else 0.0
                )
    model.save_pretrained(folder, safe_serialization=True)
    return model


# Prepended to code run with `python -c`: there `import mlx` fails, as on a machine without MLX.
BLOCK_MLX = textwrap.dedent(
    """
    import sys

    class NoMLX:
        def find_spec(self, name, path=None, target=None):
            if name == "mlx" or name.startswith("mlx."):
                raise ImportError("mlx is not installed here")
            return None

    sys.meta_path.insert(0, NoMLX())
    """
)
