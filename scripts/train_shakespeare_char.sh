#!/usr/bin/env bash
# The bar run: nanoGPT's CPU Shakespeare-char recipe (the package's RECIPE below, also what
# `mlx-transformer demo` trains) on a sentencepiece char model of the embedded Tiny Shakespeare,
# then the loss over the whole validation split (nats per character = per token here).
#
#   scripts/train_shakespeare_char.sh [RUN_DIR]        (default runs/shakespeare_char)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUN=${1:-runs/shakespeare_char}
DATA=${DATA:-runs/data/shakespeare_char}
RECIPE=${RECIPE:-shakespeare_char}  # mlx_transformer/train/recipes/: RECIPE=shakespeare_char_fast for ours

$PY -m mlx_transformer prepare --model-type char --vocab-size 330 --out "$DATA"
$PY -m mlx_transformer train --config "$RECIPE" --data "$DATA" --out "$RUN" "${@:2}"
# Whole-val loss of the final checkpoint (python -c: ensure_fast_blas re-executes the command).
$PY -c '
import json, math, sys
from mlx_transformer.cpu.blas import ensure_fast_blas
ensure_fast_blas()
from mlx_transformer.train.trainer import evaluate_checkpoint
run, data = sys.argv[1:3]
val = evaluate_checkpoint(f"{run}/latest", data, batch_size=12, num_batches=0)
val["val_nats_per_byte"] = val["val_bpb"] * math.log(2)
print(json.dumps(val, indent=2))
json.dump(val, open(f"{run}/whole_val.json", "w"), indent=2)
' "$RUN" "$DATA"
