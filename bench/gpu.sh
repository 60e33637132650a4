#!/usr/bin/env bash
# Engine efficiency and the images/hour projection on one GPU, with SD-2-base-sized random
# weights (issue 6, benchmarks 1 and 5), then every model family's denoiser at its published
# size (random weights: SD-2-base, SDXL, SD3-medium, FLUX.1, PixArt-alpha, IF-I-XL): evaluations
# per second and peak memory at a few batch sizes (bench/families_gpu.py). Under 5 minutes on
# an H200: the whole script has a budget (BUDGET, 285 s) and every step a time limit, cut to
# what the budget has left, so that a slow step cannot take the rest down with it; a step
# with under 15 s left is skipped and reported.
#
#   bench/gpu.sh              # on a machine with a CUDA GPU and the project's venv
#   bench/gpu.sh --cpu-smoke  # the same steps, shrunk models on the CPU: checks the script
#
# Writes bench/results/engine_gpu_*.txt/.json, bench/results/projection_gpu.txt and
# bench/results/families_gpu.txt/.json.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

if [ "${1:-}" = "--cpu-smoke" ]; then
  DEV=(--device cpu --cpu-smoke) FAM=(--cpu-smoke) IMAGES=4 TAG=smoke LONG=120 SHORT=120 FAMILY=120
  BUDGET=${BUDGET:-900}
else
  # At most 24 x 10 x 16 = 3,840 evaluations a loop run: about 11 s at 350/s; 6 runs a step.
  # An engine step spends 25-45 s first on cuDNN's autotuning of every batch shape it meets.
  DEV=(--device cuda) FAM=(--device cuda) IMAGES=24 TAG=gpu LONG=100 SHORT=75 FAMILY=140
  BUDGET=${BUDGET:-285}
fi
START=$SECONDS
EVALS_10=${EVALS_10:-$(sed -n 's/^| 2 | 0.125 | default | [0-9.]* | \([0-9.]*\) |.*/\1/p' bench/results/round_cost.txt)}
EVALS_10=${EVALS_10:-124.6}
status=0
step() {  # step SECONDS ARGS...: one bench run under a time limit; a failure is reported, not fatal
  local secs=$1; shift
  local left=$((BUDGET - (SECONDS - START)))
  [ "$secs" -gt "$left" ] && secs=$left
  if [ "$secs" -lt 15 ]; then echo "!! skipped (budget of $BUDGET s spent): $*" >&2; status=1; return; fi
  echo "== [${secs} s] $*" >&2
  timeout "$secs" "$PY" "$@" || { echo "!! failed or timed out ($secs s): $*" >&2; status=1; }
}

"$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
# 1. SD-2-base size, 64x64 latents, fp16, batch 256, eager: the main figure.
step "$LONG" bench/engine.py --models sd2-base "${DEV[@]}" --dtype fp16 --batch-size 256 \
  --images "$IMAGES" --classes 10 --random-max-scores 16 --repeats 2 --tag "${TAG}_sd2"
# 2. Projection from step 1's measured loop rate and the digits model's evaluations per image.
if [ -f "bench/results/engine_${TAG}_sd2.json" ]; then
  step 20 bench/projection.py --engine-json "bench/results/engine_${TAG}_sd2.json" \
    --evals-10 "$EVALS_10" --label "Measured on this GPU" --tag "projection_${TAG}"
fi
# 3. Every family at its published size: evaluations/s and peak GiB at 3 batch sizes each
#    (its own budget stops starting new measurements 10 s before the step's limit).
LEFT=$((BUDGET - (SECONDS - START)))
[ "$FAMILY" -gt "$LEFT" ] && FAMILY=$LEFT
step "$FAMILY" bench/families_gpu.py "${FAM[@]}" --budget $((FAMILY - 10)) --tag "$TAG"
# (SD-2-base in bf16, batch 64, measured once on an H200 as 0.982 of the bare forward at
#  327 evals/s, is left out to keep the script within 5 minutes: bench/results/engine_gpu_sd2_bf16.txt
#  gives its command.)
# 4. SD-1.5 size at 256 px (32x32 latents), fp16, batch 256.
step "$SHORT" bench/engine.py --models sd15-256 "${DEV[@]}" --dtype fp16 --batch-size 256 \
  --images "$IMAGES" --classes 10 --random-max-scores 16 --repeats 2 --tag "${TAG}_sd15"
echo "gpu.sh: $((SECONDS - START)) s" >&2
exit $status
