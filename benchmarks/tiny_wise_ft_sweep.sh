#!/usr/bin/env bash
# WiSE-FT alpha sweep of the tiny foundations' full fine-tunes (made by `make phenomenon`), scored
# with `specgen eval` and combined with `specgen report` into benchmarks/results/tiny_wise_ft/.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # a path made absolute: eval runs in $WORK
SPECGEN="$PY -m hf_specgen.cli"
RUNS=${RUNS:-/tmp/hf_specgen_phenomenon}
WORK=${WORK:-/tmp/hf_specgen_tiny_sweep}
OUT=benchmarks/results/tiny_wise_ft
ALPHAS=0,0.25,0.5,0.75,1
rm -rf "$WORK"
LM=$($PY -c "from hf_specgen.tiny import lm_path; print(lm_path())")
CLIP=$($PY -c "from hf_specgen.tiny import clip_path; print(clip_path())")
for name in lm clip; do
  base=$([ $name = lm ] && echo "$LM" || echo "$CLIP")
  suites=$([ $name = lm ] && echo "--suite tiny_general --suite tiny_medmcqa" || echo "--suite tiny_clip")
  $SPECGEN sweep --pretrained "$base" --finetuned "$RUNS/tiny-$name/finetuned/model" --alphas $ALPHAS --output-dir "$WORK/$name"
  for alpha in ${ALPHAS//,/ }; do  # from $WORK: records name each model relative to it, no absolute path
    (cd "$WORK" && $SPECGEN eval --model "$name/alpha-$alpha" $suites --method full --alpha "$alpha" \
      --output "records-$name/alpha-$alpha.json")
  done
done
$SPECGEN report "$WORK/records-lm" --output-dir $OUT/lm --title "tiny-galactica on tiny MedMCQA: full fine-tuning, WiSE-FT alpha sweep"
$SPECGEN report "$WORK/records-clip" --output-dir $OUT/clip --title "tiny-clip fine-tuned on photo: WiSE-FT alpha sweep"
