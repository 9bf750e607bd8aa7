#!/usr/bin/env bash
# The simulator's attribution benchmark (bench/attribution_error.py) on the GPU test machine's CPUs: its 16
# cores keep the simulated engines in real time at 64 in flight, where this project's 2-core development
# machine lets them slip (the bench prints the slip per level). Nothing here uses the GPU.
#
# The packages the proxy, qtrap-sim and the bench import: on a machine that vllm_e2e.sh left warm, vLLM's
# in /tmp/vsite and the proxy's and OpenTelemetry's wheels in /tmp/qtrap-vllm-pkgs (the default PKGS); on a
# fresh one, carry cp312 wheels of the project's dependencies (`pip download --only-binary=:all:
# --python-version 3.12 ... -d .gpu-wheels/simbench aiohttp orjson pydantic pydantic-settings pyyaml
# prometheus-client starlette uvicorn opentelemetry-proto opentelemetry-sdk
# opentelemetry-exporter-otlp-proto-http googleapis-common-protos "psycopg[binary]" requests`) and set
# WHEELS=.gpu-wheels/simbench: they are installed into /tmp/qtrap-simbench-pkgs first.
# Seeds run side by side, one bench (a simulator, a proxy, a client) per seed.
#
# Environment: SEEDS (default 1,2,3), ARGS (more bench options, default --engine-facts), ALT (a folder holding
# another copy of the repository, e.g. `git archive <commit> | tar -x -C alt`, run the same way beside this
# one: an A/B on one machine), OUT (default ./sim-attr-out).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-sim-attr-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PKGS=${PKGS:-/tmp/qtrap-vllm-pkgs:/tmp/vsite}
if [ -n "${WHEELS:-}" ]; then
  PKGS=/tmp/qtrap-simbench-pkgs
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$PKGS" "$WHEELS"/*.whl 2>&1 | tail -3
fi
export PYTHONUNBUFFERED=1
SEEDS=${SEEDS:-1,2,3}
ARGS=${ARGS:---engine-facts}
echo "sim_attribution: $(date -u +%FT%TZ), $(nproc) cores, seeds $SEEDS, args $ARGS, commit $(git rev-parse --short HEAD 2>/dev/null)"
PYTHONPATH="$PWD:$PKGS" python3 -c "import requests, yaml, aiohttp, starlette, uvicorn, opentelemetry.sdk, opentelemetry.proto, qtrap_proxy, qtrap_sim" || {
  echo "missing packages: run vllm_e2e.sh's set-up on this machine first"
  exit 3
}
pids=()
for seed in ${SEEDS//,/ }; do
  for code in main ${ALT:+alt}; do
    dir=$PWD
    [ "$code" = alt ] && dir=$(cd "$ALT" && pwd)
    # shellcheck disable=SC2086
    (cd "$dir" && PYTHONPATH="$dir:$PKGS" python3 bench/attribution_error.py --seed "$seed" $ARGS --json "$OUT/$code-$seed.json" \
      >"$OUT/$code-$seed.log" 2>&1) &
    pids+=($!)
  done
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
for f in "$OUT"/*.log; do
  echo "== ${f##*/}"
  grep -E "^level|^requests lasting|^  concurrency|covers|work model fit|mJ per decoded" "$f"
done
exit $rc
