#!/usr/bin/env bash
# Regenerate the committed figures of the demo model (PNG, in this folder). CPU only, offline.
#
#   figures/make_figures.sh                       # analyse, distil 300 steps, plot (~3-5 min on 2 idle CPU cores)
#   STUDENT=runs/my-distilled figures/make_figures.sh   # reuse a distilled model instead of training one
#
# Steps: `attnprobe analyze` on the demo model with its 14 captions → runs/demo-figures/erf.json;
# `deltadistill train` for DISTIL_STEPS steps (kernel sizes from that report) unless STUDENT is
# given; `attnprobe plot` writes the six report figures here and `deltadistill plot` the gradient-ERF one. Environment: PYTHON (default
# .venv/bin/python if present, else python3), MODEL (demo), PROMPTS (the demo captions), RUN (work
# folder), OUT (figures), STEPS (denoising steps, 20), DISTIL_STEPS (300), THREADS (torch threads, 2).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MODEL=${MODEL:-demo}
PROMPTS=${PROMPTS:-attnprobe/demo/prompts.txt}
RUN=${RUN:-runs/demo-figures}
OUT=${OUT:-figures}
STEPS=${STEPS:-20}
DISTIL_STEPS=${DISTIL_STEPS:-300}
export OMP_NUM_THREADS=${THREADS:-2} HF_HUB_OFFLINE=1

"$PYTHON" -m attnprobe.cli analyze --model "$MODEL" --prompts "$PROMPTS" --out "$RUN" \
  --steps "$STEPS" --queries all --no-plots --overwrite

if [ -z "${STUDENT:-}" ]; then
  STUDENT="$RUN-distilled"
  "$PYTHON" -m deltadistill.cli train --data "$PROMPTS" --erf-report "$RUN/erf.json" \
    --out "$STUDENT" --steps "$DISTIL_STEPS" --batch-size 4 --warmup $(( DISTIL_STEPS / 10 )) \
    --checkpoint-every 0 --overwrite --no-progress
fi

mkdir -p "$OUT"
for f in attention_maps asm_curves erf erf_heads bias_sinks erf_over_steps gradient_erf; do rm -f "$OUT/$f.png"; done
"$PYTHON" -m attnprobe.cli plot "$RUN/erf.json" --out "$OUT" --overwrite --format png --dpi 100
"$PYTHON" -m deltadistill.cli plot --distilled "$STUDENT" --erf-report "$RUN/erf.json" --out "$OUT" --overwrite \
  --format png --dpi 100
du -ch "$OUT"/{attention_maps,asm_curves,erf,erf_heads,bias_sinks,erf_over_steps,gradient_erf}.png | tail -1
