"""What several test files need: a fingerprint of a folder tree, a user's things to protect, and
the Llama-style model fields."""

from __future__ import annotations

import hashlib
import os
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
