#!/usr/bin/env bash
# qtrap's NVML attribution on a real GPU, in one go (what it measures: bench/gpu/real_nvml.py).
# For each model shape (default: qwen3-0.6b, then qwen3-8b): build a random-weight BF16 model,
# start `transformers serve --continuous-batching` and qtrap-proxy (NVML meter) in front of it,
# run the same request alone and among 8 and 32 concurrent ones, collect the JSON.
#
# Needs the proxy's (and transformers serve's) missing packages as cp312 wheels in .gpu-wheels/proxy/,
# carried with the working tree; only those whose import fails on the machine are installed:
#   pip download --no-deps --only-binary :all: --python-version 3.12 --implementation cp --abi cp312 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
#     --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 --platform any -d .gpu-wheels/proxy \
#     pydantic==2.11.9 pydantic-core==2.33.2 typing-inspection==0.4.2 annotated-types==0.7.0 \
#     pydantic-settings==2.11.0 python-dotenv==1.1.1 starlette==0.48.0 uvicorn==0.37.0 h11==0.16.0 \
#     httptools==0.9.0 orjson==3.13.0 fastapi==0.118.0 openai==1.109.1 jiter==0.11.0 distro==1.9.0 \
#     sniffio==1.3.1 aiohttp==3.14.5 aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl idna
#
# Writes to $OUT (default ./real-nvml-out): gpu.csv, run.log, real-nvml-<shape>.json, logs.tar.gz.
# Environment: SHAPES (default "qwen3-0.6b qwen3-8b"), TOTAL_S (whole job, default 560),
# SHAPE_S ("shape:seconds ..." budget each shape may start repeats in), RUN_ARGS (more driver options),
# REQUIRE_CUDA=0 for a check of the flow on a CPU (SHAPES=tiny RUN_ARGS="--serve-args=--device=cpu ...").
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
TOTAL_S=${TOTAL_S:-560}
OUT=${OUT:-real-nvml-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1

PKGS=/tmp/qtrap-proxy-pkgs
rm -rf "$PKGS"
W=.gpu-wheels/proxy
need=()
group() { # group MODULE WHEEL-PREFIX...: install these wheels when MODULE cannot be imported
  local mod=$1
  shift
  if ! python3 -c "import $mod" 2>/dev/null; then
    for p in "$@"; do
      local f=("$W/$p"-*.whl)
      if [ -e "${f[0]}" ]; then need+=("${f[0]}"); else echo "MISSING WHEEL for $mod: $W/$p-*.whl"; fi
    done
  fi
}
group pydantic pydantic pydantic_core typing_inspection annotated_types
group typing_inspection typing_inspection
group annotated_types annotated_types
group pydantic_settings pydantic_settings
group dotenv python_dotenv
group starlette starlette
group uvicorn uvicorn
group h11 h11
group httptools httptools
group orjson orjson
group fastapi fastapi
group openai openai
group jiter jiter
group distro distro
group sniffio sniffio
group aiohttp aiohttp aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl idna
mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
echo "installing ${#need[@]} wheels: ${need[*]##*/}"
if [ "${#need[@]}" -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$PKGS" "${need[@]}" 2>&1 | tail -3
fi
export PYTHONPATH="$PKGS:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# everything the proxy and transformers serve import, checked before any GPU time is spent
if ! python3 bench/gpu/check_imports.py --serve qtrap_proxy.server qtrap_proxy.energy.service qtrap_proxy.ledger \
  pynvml aiohttp yaml orjson uvicorn starlette pydantic pydantic_settings prometheus_client torch tokenizers \
  transformers fastapi openai; then
  echo "missing packages: see above (add their wheels to $W)"
  exit 3
fi
nvidia-smi --query-gpu=name,driver_version,power.limit,power.draw,clocks.max.sm,memory.total --format=csv >"$OUT/gpu.csv" 2>&1
cat "$OUT/gpu.csv"

WORK=/tmp/qtrap-real
mkdir -p "$WORK"
for shape in ${SHAPES:-qwen3-0.6b qwen3-8b}; do
  now=$(date +%s)
  left=$((START + TOTAL_S - now))
  if [ "$left" -lt 120 ]; then
    echo "skipping $shape: only $left s left"
    continue
  fi
  budget=$(echo "${SHAPE_S:-qwen3-0.6b:220}" | tr ' ' '\n' | awk -F: -v s="$shape" '$1 == s {print $2}')
  budget=${budget:-$((left - 20))}
  [ "$budget" -gt $((left - 20)) ] && budget=$((left - 20))
  export QTRAP_DEADLINE_UNIX=$((now + budget))
  echo "== $shape: $left s left, repeats may start until +$budget s"
  # shellcheck disable=SC2086
  timeout --signal=TERM --kill-after=10 $((left - 5)) python3 bench/gpu/real_nvml.py run --shape "$shape" \
    --work "$WORK" --logs "$WORK/logs-$shape" --out "$OUT/real-nvml-$shape.json" ${RUN_ARGS:-}
  echo "== $shape: exit $?, $(($(date +%s) - now)) s"
  rm -rf "${WORK:?}/$shape" # the model's weights
done
tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude='*.safetensors' --exclude='hf-home' . 2>/dev/null
echo "done in $(($(date +%s) - START)) s"
