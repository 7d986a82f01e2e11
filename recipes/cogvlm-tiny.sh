#!/usr/bin/env bash
# Reproduces the shipped cogvlm-tiny from scratch with `cogvlm finetune`, then scores it.
#   bash recipes/cogvlm-tiny.sh [OUT]        (about 16 hours on 2 CPU cores: 67 + 66 + ~85 + ~86 + ~92 + ~48 + ~100 + ~113 + ~104 + ~122 + ~93 minutes)
# Stage 1 trains the decoder from random weights on 12,000 scenes with the loss averaged over
# answer tokens; stage 2 continues on 12,000 new scenes, the ViT training too, with every example
# weighted the same, so one-word VQA answers are not drowned out by long grounded captions;
# stages 3 to 8 go on the same way, each on 12,000 more new scenes, the learning rate never rising;
# stage 9 trains mostly on crowded scenes; stages 10 and 11 mostly on captions and grounded captions.
# The adapter stays frozen at its random initialization in every stage: training it erases
# the horizontal place of objects before the decoder learns to read it (README, cogvlm-tiny).
# Afterwards: copy OUT/run11/final/{config.json,*.safetensors,*.json,tokenizer.model}
# into cogvlm/weights/cogvlm-tiny/ to ship it.
set -euo pipefail
OUT=${1:-runs/cogvlm-tiny}
HERE=$(cd "$(dirname "$0")" && pwd)
COMMON=(--batch-size 32 --min-lr-ratio 0.05 --weight-decay 0.01 --save-dtype bf16
        --eval-data "$OUT/data/held/data.jsonl" ${RESUME:+--resume})
LATER=("${COMMON[@]}" --train vision_expert,language,vit --loss-average example)  # stages 2-11

python -m cogvlm.data.synthetic "$OUT/data/train" --n 12000 --seed 0 --size 112
python -m cogvlm.data.synthetic "$OUT/data/held" --n 150 --seed 1 --size 112
cogvlm train-tokenizer "$OUT/data/train/data.jsonl" "$OUT/tokenizer.model" --vocab-size 512
cogvlm finetune "${COMMON[@]}" --data "$OUT/data/train/data.jsonl" --init-config "$HERE/cogvlm-tiny.json" \
  --train vision_expert,language --tokenizer "$OUT/tokenizer.model" --steps 4200 --lr 1e-3 --warmup 200 \
  --eval-every 600 --save-every 300 --seed 0 --out "$OUT/run"
# later_stage N DATA_SEED FINETUNE_ARGS...: 12,000 new scenes, then train from stage N-1's weights
later_stage() {
  local n=$1 seed=$2 from=run$(( $1 - 1 )); shift 2
  [ "$n" = 2 ] && from=run  # stage 1 wrote to OUT/run
  python -m cogvlm.data.synthetic "$OUT/data/train$n" --n 12000 --seed "$seed" --size 112
  cogvlm finetune "${LATER[@]}" --data "$OUT/data/train$n/data.jsonl" --model "$OUT/$from/final" \
    --out "$OUT/run$n" "$@"
}
later_stage 2 3 --steps 3400 --lr 5e-4 --warmup 100 --eval-every 850 --save-every 425 --seed 1
later_stage 3 4 --steps 4000 --lr 2e-4 --warmup 50 --eval-every 1000 --save-every 400 --seed 2
later_stage 4 5 --steps 4400 --lr 1.5e-4 --warmup 50 --eval-every 1100 --save-every 400 --seed 3
later_stage 5 6 --steps 4400 --lr 1e-4 --warmup 50 --eval-every 1100 --save-every 400 --seed 4
later_stage 6 8 --steps 2200 --lr 7e-5 --warmup 50 --eval-every 1100 --save-every 400 --seed 5
later_stage 7 9 --steps 4400 --lr 7e-5 --warmup 50 --eval-every 1100 --save-every 400 --seed 6
later_stage 8 10 --steps 4400 --lr 7e-5 --warmup 50 --eval-every 1100 --save-every 400 --seed 7
# mixed_stage N "SCENES_A" "SCENES_B" FINETUNE_ARGS...: two synthetic sets joined into one file
# (`finetune --data` takes one), then train from stage N-1's weights
mixed_stage() {
  local n=$1 dir="$OUT/data/train$1" a=$2 b=$3; shift 3
  python -m cogvlm.data.synthetic "$dir" --size 112 $a
  mv "$dir/data.jsonl" "$dir/a.jsonl"
  python -m cogvlm.data.synthetic "$dir" --size 112 $b
  mv "$dir/data.jsonl" "$dir/b.jsonl"
  cat "$dir/a.jsonl" "$dir/b.jsonl" > "$dir/data.jsonl"
  cogvlm finetune "${LATER[@]}" --data "$dir/data.jsonl" --model "$OUT/run$(( n - 1 ))/final" \
    --out "$OUT/run$n" "$@"
}
# Stage 9: crowded scenes, where the caption misses are: 9,000 of 3-4 objects and 3,000 of any kind
mixed_stage 9 "--n 9000 --seed 11 --min-objects 3" "--n 3000 --seed 12" \
  --steps 4000 --lr 7e-5 --warmup 50 --eval-every 1000 --save-every 400 --seed 8
# Stage 10: caption-heavy: 20,000 scenes with only their caption and grounded caption, 4,000 with all tasks
mixed_stage 10 "--n 20000 --seed 13 --tasks caption grounded_caption" "--n 4000 --seed 14" \
  --steps 3200 --lr 7e-5 --warmup 50 --eval-every 800 --save-every 400 --seed 9
# Stage 11: caption-heavy and crowded: 20,000 scenes of 3-4 objects with only their caption and
# grounded caption, 4,000 with all tasks
mixed_stage 11 "--n 20000 --seed 15 --tasks caption grounded_caption --min-objects 3" "--n 4000 --seed 16" \
  --steps 3200 --lr 6e-5 --warmup 50 --eval-every 800 --save-every 400 --seed 10
# scores on scenes made with a seed never used in training
python -m cogvlm.data.synthetic "$OUT/data/test" --n 200 --seed 7 --size 112
cogvlm eval "$OUT/data/test/data.jsonl" --model "$OUT/run11/final" --output "$OUT/eval.json"
