#!/usr/bin/env bash
# Set up (first run) and run the main job on the embedded default: simulated backends, no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/qtrap-proxy demo "$@"
