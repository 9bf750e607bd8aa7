#!/usr/bin/env bash
# The whole qtrap stack on one GPU, in one go (what each step does: bench/gpu/e2e.py's docstring).
#   sweep:     random-weight Qwen3-shaped model; transformers serve at BF16, bnb-8bit and bnb-4bit side by
#              side; qtrap-proxy (NVML meter) with the three as one pool; a loadgen sweep through it
#   calibrate: the kernel-level probe (bench/gpu/calibrate.py) for the same shape and precisions, with CUDA
#              graphs and without, for the cross-check
# Each step writes under $RES/<shape>/ (sweep) or $RES/calib-<shape>-<mode>.json (calibrate), with its logs,
# also when it fails; after every step $RES is packed into $OUT/e2e-results.tar.gz (the test machine sends
# back only a few files), and the console goes to $OUT/run.log. The whole job keeps to TOTAL_S seconds
# (a command on the test machine may run 10 minutes).
#
# Needs, carried with the working tree as cp312 wheels (installed only when an import fails):
#   .gpu-wheels/proxy/   the proxy's and transformers serve's packages (list: bench/gpu/real_nvml.sh)
#   .gpu-wheels/loadgen/ rich, markdown-it-py, mdurl, pygments (loadgen's terminal output):
#     pip download --no-deps --only-binary :all: --python-version 3.12 --implementation cp --abi cp312 \
#       --platform manylinux_2_17_x86_64 --platform any -d .gpu-wheels/loadgen rich markdown-it-py mdurl pygments
#   .gpu-wheels/bitsandbytes-0.50.2-*.whl
# matplotlib is optional: without it loadgen writes report.json, requests.csv and an HTML report without
# plots; `python -m loadgen render <shape>/loadgen/report.json` (from the unpacked results) draws them.
#
# Environment: STEPS (default "sweep"), SHAPES (default qwen3-0.6b), TOTAL_S (default 570), OUT
# (default ./e2e-out), RES (default /tmp/qtrap-e2e-results), CONCURRENCY (default 1,8,32), DURATION_S
# (steady state per level, default 20), MAX_TOKENS (default 32), PRECISIONS (default bf16,bnb-8bit,bnb-4bit),
# TAG (sweep folder $RES/<shape>-<TAG>), RUN_ARGS (more e2e.py run options), CALIB_KERNELS, CALIB_BATCHES,
# CALIB_MODES (default "graph eager"), CALIB_ARGS.
# REQUIRE_CUDA=0 checks the flow on a CPU, e.g.:
#   REQUIRE_CUDA=0 SHAPES=tiny RUN_ARGS="--meter sim --no-quant --serve-args=--device=cpu" bash bench/gpu/e2e.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source bench/gpu/lib.sh
run_prologue e2e-results.tar.gz e2e-out /tmp/qtrap-e2e-results 570
echo "e2e: $(date -u +%FT%TZ), steps ${STEPS:-sweep}, shapes ${SHAPES:-qwen3-0.6b}, commit $(git rev-parse --short HEAD 2>/dev/null)"

PKGS=/tmp/qtrap-e2e-pkgs
rm -rf "$PKGS"
need=()
group() { # group DIR MODULE WHEEL-PREFIX...: install these wheels when MODULE cannot be imported
  local dir=$1 mod=$2
  shift 2
  if ! python3 -c "import $mod" 2>/dev/null; then
    for p in "$@"; do
      local f=("$dir/$p"-*.whl)
      if [ -e "${f[0]}" ]; then need+=("${f[0]}"); else echo "MISSING WHEEL for $mod: $dir/$p-*.whl"; fi
    done
  fi
}
W=.gpu-wheels/proxy
group $W pydantic pydantic pydantic_core typing_inspection annotated_types
group $W typing_inspection typing_inspection
group $W annotated_types annotated_types
group $W pydantic_settings pydantic_settings
group $W dotenv python_dotenv
group $W starlette starlette
group $W uvicorn uvicorn
group $W h11 h11
group $W httptools httptools
group $W orjson orjson
group $W fastapi fastapi
group $W openai openai
group $W jiter jiter
group $W distro distro
group $W sniffio sniffio
group $W aiohttp aiohttp aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl idna
group .gpu-wheels/loadgen rich rich markdown_it_py mdurl pygments
group .gpu-wheels/loadgen markdown_it markdown_it_py mdurl
group .gpu-wheels/loadgen pygments pygments
group .gpu-wheels bitsandbytes bitsandbytes
if [ "${#need[@]}" -gt 0 ]; then
  mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
  echo "installing ${#need[@]} wheels: ${need[*]##*/}"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$PKGS" "${need[@]}" 2>&1 | tail -3
fi
export PYTHONPATH="$PKGS:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# everything the servers, the proxy and loadgen import, checked before any GPU time is spent
mods=(qtrap_proxy.server qtrap_proxy.energy.service qtrap_proxy.ledger aiohttp yaml orjson uvicorn starlette
  pydantic pydantic_settings prometheus_client torch tokenizers transformers fastapi openai numpy rich loadgen.app
  loadgen.analysis)
[ "${REQUIRE_CUDA:-1}" = 1 ] && mods+=(pynvml bitsandbytes)
if ! python3 bench/gpu/check_imports.py --serve "${mods[@]}" --optional matplotlib uvloop; then
  echo "missing packages: see above (add their wheels to .gpu-wheels/)"
  exit 3
fi
nvidia-smi --query-gpu=name,driver_version,power.limit,power.draw,clocks.max.sm,memory.total,memory.used \
  --format=csv >"$RES/gpu.csv" 2>&1
cat "$RES/gpu.csv"

for step in ${STEPS:-sweep}; do
  for shape in ${SHAPES:-qwen3-0.6b}; do
    now=$(date +%s)
    l=$(left)
    case $step in
    sweep)
      if [ "$l" -lt 150 ]; then
        echo "== skipping sweep of $shape: only $l s left"
        continue
      fi
      echo "== sweep $shape: $l s left"
      dir="$RES/$shape${TAG:+-$TAG}"
      mkdir -p "$dir"
      export QTRAP_DEADLINE_UNIX=$((now + l - 15))
      # shellcheck disable=SC2086
      timeout --signal=TERM --kill-after=10 $((l - 5)) python3 bench/gpu/e2e.py run --shape "$shape" \
        --out "$dir" --concurrency "${CONCURRENCY:-1,8,32}" --duration "${DURATION_S:-20}" \
        --max-tokens "${MAX_TOKENS:-32}" --precisions "${PRECISIONS:-bf16,bnb-8bit,bnb-4bit}" ${RUN_ARGS:-}
      echo "== sweep $shape: exit $?, $(($(date +%s) - now)) s"
      rm -rf "/tmp/qtrap-e2e/$shape" # the model's weights
      pack
      ;;
    calibrate)
      if [ "$l" -lt 40 ]; then
        echo "== skipping calibration of $shape: only $l s left"
        continue
      fi
      k=${CALIB_KERNELS:-bf16,bnb_int8,bnb_nf4,bnb_nf4_serve}
      b=${CALIB_BATCHES:-1,2,4,8,16,32,64}
      for mode in ${CALIB_MODES:-graph eager}; do
        l=$(left)
        [ "$l" -lt 40 ] && { echo "== skipping $mode calibration: $l s left"; continue; }
        extra=""
        [ "$mode" = eager ] && extra="--no-graph"
        echo "== calibrate $shape ($mode): $l s left"
        # shellcheck disable=SC2086
        timeout --signal=TERM --kill-after=10 $((l - 5)) python3 bench/gpu/calibrate.py --models "$shape" \
          --kernels "$k" --batches "$b" --out "$RES/calib-$shape-$mode.json" $extra ${CALIB_ARGS:-} 2>&1 |
          grep -v "registered at" | tee "$RES/calib-$shape-$mode.log" | tail -60
        echo "== calibrate $shape ($mode): $(($(date +%s) - now)) s"
        pack
      done
      ;;
    *) echo "unknown step $step" ;;
    esac
  done
done
echo "done in $(($(date +%s) - START)) s"
