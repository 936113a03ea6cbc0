#!/usr/bin/env bash
# Your own model, data and loss through every lowbit command, named by import path.
#
# The model, the data (generated, no downloads), the loss and the metric are the functions of
# examples/tabular_mlp.py. Each command writes a run directory under $OUT; later commands rebuild the same
# model, data and loss from the run they start from (--from).
#
#   bash examples/tabular_cli.sh                     # about a minute on a CPU
#   ROWS=600 EPOCHS=2 OUT=/tmp/tab bash examples/tabular_cli.sh    # smaller (the test suite runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
LOWBIT=${LOWBIT:-lowbit}
OUT=${OUT:-runs/tabular}
ROWS=${ROWS:-3000}
EPOCHS=${EPOCHS:-8}
CODE=examples/tabular_mlp.py

rm -rf "$OUT"
$LOWBIT train --model $CODE:make_model --model-args '{hidden: 64}' --data $CODE:make_data \
    --data-args "{rows: $ROWS}" --loss $CODE:weighted_ce --metric $CODE:macro_f1 \
    --epochs "$EPOCHS" --lr 0.05 --batch-size 64 --quiet --out "$OUT/fp32"
$LOWBIT eval --from "$OUT/fp32" --metric $CODE:macro_f1
$LOWBIT quantize --from "$OUT/fp32" --bits w4a4 --distill --epochs 2 --batch-size 64 --metric $CODE:macro_f1 \
    --quiet --out "$OUT/w4a4"
$LOWBIT sensitivity --from "$OUT/w4a4" --method eagl --quiet --out "$OUT/sens-eagl"
$LOWBIT sensitivity --from "$OUT/w4a4" --method alps --metric $CODE:macro_f1 --epochs 1 --batch-size 64 \
    --quiet --out "$OUT/sens-alps"
$LOWBIT select --from "$OUT/w4a4" --sensitivity "$OUT/sens-alps" --budget 0.5 --out "$OUT/plan.yaml"
$LOWBIT frontier --from "$OUT/w4a4" --methods eagl,alps,random --budgets 0.5,1.0 --epochs 1 --alps-epochs 1 \
    --batch-size 64 --metric $CODE:macro_f1 --quiet --out "$OUT/frontier"
$LOWBIT export --from "$OUT/frontier" --best --min-throughput 1.1 --out "$OUT/mixed.lowbit" --verify
$LOWBIT infer "$OUT/mixed.lowbit" --backend fast
$LOWBIT bench "$OUT/mixed.lowbit" --batch 1,256 --runs 10 --budget 10 --no-onnx --quiet
