#!/usr/bin/env bash
# Set up (first run) and run the main job on the embedded default: simulated backends, no GPU.
# Extra arguments go to loadgen (e.g. --concurrency 1,4,16,64 --out DIR); see `python -m loadgen --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m loadgen --concurrency 1,8,64 "$@"
