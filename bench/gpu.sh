#!/usr/bin/env bash
# Engine efficiency and the images/hour projection on one GPU, with SD-2-base-sized random
# weights (issue 6, benchmarks 1 and 5). Under 5 minutes on an H100; every step has a time
# limit (120 + 75 + 75 + 30 s at most) so that a slow step cannot take the rest down with it.
#
#   bench/gpu.sh              # on a machine with a CUDA GPU and the project's venv
#   bench/gpu.sh --cpu-smoke  # the same steps, shrunk models on the CPU: checks the script
#
# Writes bench/results/engine_gpu_*.txt/.json and bench/results/projection_gpu.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

if [ "${1:-}" = "--cpu-smoke" ]; then
  DEV=(--device cpu --cpu-smoke) IMAGES=4 TAG=smoke LONG=120 SHORT=120
else
  # At most 24 x 10 x 16 = 3,840 evaluations a loop run: about 11 s at 350/s; 6 runs a step.
  DEV=(--device cuda) IMAGES=24 TAG=gpu LONG=120 SHORT=75
fi
EVALS_10=${EVALS_10:-$(sed -n 's/^| 2 | 0.125 | default | [0-9.]* | \([0-9.]*\) |.*/\1/p' bench/results/round_cost.txt)}
EVALS_10=${EVALS_10:-124.6}
status=0
step() {  # step SECONDS ARGS...: one bench run under a time limit; a failure is reported, not fatal
  local secs=$1; shift
  echo "== $*" >&2
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
# 2. The same in bf16, batch 64.
step "$SHORT" bench/engine.py --models sd2-base "${DEV[@]}" --dtype bf16 --batch-size 64 \
  --images "$IMAGES" --classes 10 --random-max-scores 8 --repeats 2 --tag "${TAG}_sd2_bf16"
# 3. SD-1.5 size at 256 px (32x32 latents), fp16, batch 256.
step "$SHORT" bench/engine.py --models sd15-256 "${DEV[@]}" --dtype fp16 --batch-size 256 \
  --images "$IMAGES" --classes 10 --random-max-scores 16 --repeats 2 --tag "${TAG}_sd15"
# 4. Projection from step 1's measured loop rate and the digits model's evaluations per image.
if [ -f "bench/results/engine_${TAG}_sd2.json" ]; then
  step 30 bench/projection.py --engine-json "bench/results/engine_${TAG}_sd2.json" \
    --evals-10 "$EVALS_10" --label "Measured on this GPU" --tag "projection_${TAG}"
fi
exit $status
