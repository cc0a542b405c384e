#!/usr/bin/env bash
# One short check for a CUDA machine (never run yet: no GPU has been available to this project).
#
#   1. MLX's CUDA backend: a small Llama-style model's logits on the GPU against the CPU, greedy
#      tokens equal, decode tokens/s (batch 1 and 8) and training tokens/s on the GPU.
#   2. onnxruntime's CUDA provider: export that checkpoint (portable and ort flavours) and run
#      `mlx-transformer verify --provider cuda` (parity, greedy tokens, where the nodes ran).
#
# Needs a Python with this package and `mlx[cuda]`, `onnxruntime-gpu` installed. Offline (the
# device machine reaches nothing), install them first from carried wheels: WHEELS=dir.
#
#   PY=.venv/bin/python OUT=/tmp/gpu scripts/gpu_check.sh       # results in $OUT/gpu_check.*
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" -e . "mlx[cuda]" onnxruntime-gpu
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu_check.txt"

export PYTHONPATH=$PWD
"$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$OUT/gpu_check.txt"
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from mlx_transformer.checkpoint.mlx_io import save_checkpoint
from mlx_transformer.config import ModelConfig
from mlx_transformer.generate.api import batch_generate_step
from mlx_transformer.model import Transformer

out = Path(sys.argv[1])
report = {"mlx": mx.__version__, "gpu": mx.is_available(mx.gpu), "device": mx.device_info()}
cfg = ModelConfig(vocab_size=8000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, intermediate_size=2048, max_position_embeddings=512,
                  position_encoding="rope", norm_type="rmsnorm", hidden_act="swiglu",
                  attention_bias=False, mlp_bias=False, tie_word_embeddings=False)
mx.random.seed(0)
model = Transformer(cfg)
model.eval()
mx.eval(model.parameters())
save_checkpoint(out / "ckpt", model)
ids = mx.random.randint(0, 8000, (8, 128))
prompts = ids.tolist()


def greedy(n):
    return [t[0] for t in batch_generate_step(prompts[:1], model, max_tokens=n)]


def decode_tps(batch, n=64):
    list(batch_generate_step(prompts[:batch], model, max_tokens=4))  # warm-up (kernels)
    tic = time.perf_counter()
    list(batch_generate_step(prompts[:batch], model, max_tokens=n))
    return batch * n / (time.perf_counter() - tic)


with mx.stream(mx.cpu):
    cpu_logits, cpu_tokens = model(ids[:1]), greedy(32)
    mx.eval(cpu_logits)
mx.set_default_device(mx.gpu)
gpu_logits = model(ids[:1])
report["max_logit_diff_gpu_vs_cpu"] = mx.abs(gpu_logits - cpu_logits).max().item()
report["greedy_tokens_equal"] = greedy(32) == cpu_tokens
report["decode_tps"] = {f"b{b}": decode_tps(b) for b in (1, 8)}

model.train()
opt = optim.AdamW(1e-4)
loss_fn = lambda m, x, y: nn.losses.cross_entropy(m(x), y).mean()  # noqa: E731
step = nn.value_and_grad(model, loss_fn)
x, y = ids[:, :-1], ids[:, 1:]
for i in range(13):  # 3 warm-up steps, then 10 timed
    if i == 3:
        tic = time.perf_counter()
    loss, grads = step(model, x, y)
    opt.update(model, grads)
    mx.eval(loss, model.parameters(), opt.state)
report["train_tps_b8_ctx127"] = 10 * x.size / (time.perf_counter() - tic)
ok = report["max_logit_diff_gpu_vs_cpu"] < 1e-3 and report["greedy_tokens_equal"]
report["mlx_cuda_ok"] = ok
print(json.dumps(report, indent=2, default=str))
(out / "gpu_check_mlx.json").write_text(json.dumps(report, indent=2, default=str))
EOF

for flavour in portable ort; do
  "$PY" -m mlx_transformer export --overwrite --flavour "$flavour" --no-measure \
    "$OUT/ckpt" "$OUT/onnx-$flavour" >/dev/null
  "$PY" -m mlx_transformer verify --provider cuda --report "$OUT/verify-$flavour" \
    "$OUT/ckpt" "$OUT/onnx-$flavour" 2>&1 | tee -a "$OUT/gpu_check.txt" || true
done
echo "results: $OUT/gpu_check.txt, $OUT/gpu_check_mlx.json, $OUT/verify-*/verify.md"
