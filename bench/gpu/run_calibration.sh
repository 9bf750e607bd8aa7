#!/usr/bin/env bash
# Run the kernel calibration probe on the H100 test machine, in one go.
# Needs the bitsandbytes wheel in .gpu-wheels/ (carried with the working tree):
#   pip download bitsandbytes==0.50.2 --no-deps --only-binary :all: --python-version 3.12 \
#       --platform manylinux_2_24_x86_64 -d .gpu-wheels
# Writes calib-<model>.json and the logs to $OUT (default: ./calibration-out).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-calibration-out}
mkdir -p "$OUT"
PKGS=/tmp/qtrap-gpu-pkgs
python3 -m pip install -q --no-index --no-deps --target "$PKGS" .gpu-wheels/bitsandbytes-*.whl 2>&1 | tail -2
export PYTHONPATH="$PKGS${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv > "$OUT/gpu.csv" 2>&1
for model in ${MODELS:-qwen3-0.6b qwen3-8b}; do
  timeout "${PER_MODEL_S:-280}" python3 bench/gpu/calibrate.py --models "$model" --out "$OUT/calib-$model.json" \
    ${CALIB_ARGS:-} 2>&1 | grep -v "registered at" | tee "$OUT/calib-$model.log" | tail -80
done
