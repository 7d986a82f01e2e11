#!/usr/bin/env bash
# Reproduces the shipped cogvlm-tiny from scratch with `cogvlm finetune`, then scores it.
#   bash recipes/cogvlm-tiny.sh [OUT]        (about 95 minutes on 2 CPU cores)
# Afterwards: copy OUT/run/final/{config.json,*.safetensors,*.json,tokenizer.model}
# into cogvlm/weights/cogvlm-tiny/ to ship it.
set -euo pipefail
OUT=${1:-runs/cogvlm-tiny}
STEPS=${STEPS:-4200}
HERE=$(cd "$(dirname "$0")" && pwd)

python -m cogvlm.data.synthetic "$OUT/data/train" --n 12000 --seed 0 --size 112
python -m cogvlm.data.synthetic "$OUT/data/held" --n 150 --seed 1 --size 112
cogvlm train-tokenizer "$OUT/data/train/data.jsonl" "$OUT/tokenizer.model" --vocab-size 512
cogvlm finetune --data "$OUT/data/train/data.jsonl" --eval-data "$OUT/data/held/data.jsonl" \
  --init-config "$HERE/cogvlm-tiny.json" --tokenizer "$OUT/tokenizer.model" --train all \
  --steps "$STEPS" --batch-size 32 --lr 1e-3 --warmup 200 --min-lr-ratio 0.05 --weight-decay 0.01 \
  --eval-every 600 --save-every 300 --save-dtype bf16 --seed 0 --out "$OUT/run" ${RESUME:+--resume}
# scores on scenes made with a seed never used in training
python -m cogvlm.data.synthetic "$OUT/data/test" --n 200 --seed 7 --size 112
cogvlm eval "$OUT/data/test/data.jsonl" --model "$OUT/run/final" --output "$OUT/eval.json"
