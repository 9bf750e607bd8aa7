#!/usr/bin/env bash
# Real vLLM behind qtrap-proxy on the GPU test machine, one shape per command (what each step does:
# bench/gpu/vllm_e2e.py's docstring). Re-runnable from a clean checkout with the prepared archives.
#
# vLLM 0.26.0 travels in two archives, built here once (about 6 minutes; git-ignored):
#   bash <the vLLM packing script> .gpu-vllm     -> .gpu-vllm/{A.tar.xz,B.tar.xz,manifest.sha256,unpack.sh}
# and the proxy's few packages that neither the machine nor vLLM's set has, as cp312 wheels:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform any -d .gpu-wheels/vllm-proxy pydantic-settings python-dotenv orjson PyYAML click h11 anyio \
#     idna typing-extensions psycopg psycopg-binary
# Each command carries at most 64 MiB, so the set-up takes two commands sent back to back (the machine stays
# warm, and /tmp with it, for 30 s after a command):
#   1. carry .gpu-vllm/A.tar.xz .gpu-vllm/unpack.sh .gpu-vllm/manifest.sha256 .gpu-wheels/vllm-proxy:
#      bash bench/gpu/vllm_e2e.sh   (unpacks A, installs the wheels, writes the model folders of $SHAPES,
#      exits 3: "send B")
#   2. carry .gpu-vllm/B.tar.xz .gpu-vllm/unpack.sh .gpu-vllm/manifest.sha256 (B is 55.8 MB: with the working
#      tree it must stay under 64 MiB; the wheels were installed by command 1):
#      SHAPES=qwen3-8b bash bench/gpu/vllm_e2e.sh        (the sweep; about 8-10 minutes)
#   3. later shapes on the same warm machine: nothing to carry.
#   A working tree of more than about 8 MB leaves no room for B beside it: split B and send its first part with
#   command 1 (head -c 10000000 B.tar.xz > B.1; tail -c +10000001 B.tar.xz > B.2), kept in /tmp by
#   `mkdir -p /tmp/qb && cp .gpu-vllm/B.1 /tmp/qb/ && ...`, and in command 2 carry B.2 instead of B.tar.xz and
#   run `cat /tmp/qb/B.1 .gpu-vllm/B.2 > .gpu-vllm/B.tar.xz && ...` first (unpack.sh checks the whole file).
# JOB=facts (engine facts, bench/gpu/vllm_facts.py): command 1 also carries .gpu-wheels/otel (the OpenTelemetry
#   SDK and exporters, below) and both commands run with JOB=facts; SHAPES is one shape (default qwen3-8b),
#   PRECISIONS default bf16,fp8.
# JOB=routing (routing by cost, bench/gpu/vllm_routing.py): one schedule under each pinned precision and under
#   routing: cost; SHAPES is one shape (default qwen3-8b), PRECISIONS default bf16,fp8,w4a16; on a machine
#   left warm by an earlier command nothing needs carrying.
# Results: $RES/<shape>[-$TAG]/ (e2e-run.json, e2e-summary.md, loadgen/, protocol/, logs/, poll.json.gz,
# ledger.sqlite.gz), packed into $OUT/vllm-results.tar.gz after every step, console in $OUT/run.log.
#
# Environment: SHAPES (default qwen3-0.6b), PRECISIONS (default bf16,fp8,w8a8,w4a16), CONCURRENCY (default
# 1,4,16,64,128,256), DURATION_S (steady state per level, default 8), MAX_TOKENS (default 64), KV_TOKENS
# (KV cache per server, default 120000), TAG, TOTAL_S (whole command, default 575), RUN_ARGS (more
# vllm_e2e.py run options), OUT (default ./vllm-out), RES (default /tmp/qtrap-vllm-results).
# A check of the flow on a CPU, without vLLM (qtrap-sim speaks vLLM's API; nothing here is a measurement):
#   ENGINE=sim REQUIRE_CUDA=0 RUN_ARGS="--meter sim" CONCURRENCY=1,4 DURATION_S=2 bash bench/gpu/vllm_e2e.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source bench/gpu/lib.sh
run_prologue vllm-results.tar.gz vllm-out /tmp/qtrap-vllm-results 575
ENGINE=${ENGINE:-vllm}
SITE=/tmp/vsite
echo "vllm_e2e: $(date -u +%FT%TZ), engine $ENGINE, shapes ${SHAPES:-qwen3-0.6b}, commit $(git rev-parse --short HEAD 2>/dev/null)"

if [ "$ENGINE" = vllm ]; then
  bash .gpu-vllm/unpack.sh
  unpacked=$?
else
  unpacked=0
fi

# the proxy and loadgen run on the machine's python3 with vLLM's packages (one version of each package
# across both), plus the wheels of whatever still fails to import
PKGS=/tmp/qtrap-vllm-pkgs
mkdir -p "$PKGS"
export PYTHONPATH="$PWD:$PKGS${PYTHONPATH:+:$PYTHONPATH}"
[ "$ENGINE" = vllm ] && export PYTHONPATH="$PYTHONPATH:$SITE"
need=()
for pair in pydantic_settings:pydantic_settings dotenv:python_dotenv orjson:orjson yaml:pyyaml click:click \
  h11:h11 anyio:anyio idna:idna typing_extensions:typing_extensions psycopg:psycopg \
  psycopg_binary:psycopg_binary; do
  mod=${pair%%:*} whl=${pair##*:}
  if ! python3 -c "import $mod" 2>/dev/null; then
    f=(.gpu-wheels/vllm-proxy/"$whl"-*.whl)
    if [ -e "${f[0]}" ]; then need+=("${f[0]}"); else echo "MISSING WHEEL for $mod: .gpu-wheels/vllm-proxy/$whl-*.whl"; fi
  fi
done
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing ${#need[@]} wheels: ${need[*]##*/}"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$PKGS" "${need[@]}" 2>&1 | tail -3
fi
# The OpenTelemetry SDK and both OTLP exporters (vLLM imports the gRPC one too before it traces;
# the proxy's receiver needs opentelemetry-proto), from .gpu-wheels/otel (pip download, as above, of
# opentelemetry-sdk opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-grpc
# opentelemetry-proto with their dependencies)
if [ -d .gpu-wheels/otel ] && ! python3 -c \
  "import opentelemetry.sdk, opentelemetry.proto, opentelemetry.exporter.otlp.proto.http, opentelemetry.exporter.otlp.proto.grpc" 2>/dev/null; then
  otel=()
  for f in .gpu-wheels/otel/*.whl; do
    case "${f##*/}" in  # keep the machine's own protobuf, grpcio, requests and friends where it has them
      protobuf-*) python3 -c "import google.protobuf as p, sys; sys.exit(int(p.__version__.split('.')[0]) < 5)" 2>/dev/null && continue ;;
      grpcio-*) python3 -c "import grpc" 2>/dev/null && continue ;;
      requests-*|urllib3-*|certifi-*|charset_normalizer-*|idna-*|typing_extensions-*)
        m=${f##*/}; m=${m%%-*}; python3 -c "import $m" 2>/dev/null && continue ;;
    esac
    otel+=("$f")
  done
  echo "installing ${#otel[@]} OpenTelemetry wheels"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$PKGS" "${otel[@]}" 2>&1 | tail -3
fi

SHAPE_LIST=${SHAPES:-qwen3-0.6b}
# model folders (config and tokenizer only: the servers use --load-format dummy)
for shape in $SHAPE_LIST; do
  python3 bench/gpu/vllm_e2e.py models --shape "$shape" --dir /tmp/qtrap-vllm/models >/dev/null ||
    echo "model folders for $shape: failed"
done
if [ "$unpacked" -ne 0 ]; then
  echo "vLLM part B is not unpacked yet: send the second command (carry B) within 30 s"
  exit 3
fi

mods=(qtrap_proxy.server qtrap_proxy.energy.service qtrap_proxy.ledger aiohttp yaml orjson uvicorn starlette
  pydantic pydantic_settings prometheus_client numpy rich loadgen.app loadgen.analysis tokenizers transformers)
[ "${REQUIRE_CUDA:-1}" = 1 ] && mods+=(pynvml torch vllm)
if ! python3 bench/gpu/check_imports.py "${mods[@]}" --optional matplotlib uvloop; then
  echo "missing packages: see above"
  exit 3
fi
nvidia-smi --query-gpu=name,driver_version,power.limit,power.draw,clocks.max.sm,memory.total,memory.used \
  --format=csv >"$RES/gpu.csv" 2>&1
cat "$RES/gpu.csv"

if [ "${JOB:-sweep}" = facts ]; then  # engine facts: vLLM's spans joined to the proxy's requests
  shape=${SHAPES:-qwen3-8b}
  dir="$RES/facts-$shape${TAG:+-$TAG}"
  mkdir -p "$dir"
  l=$(left)
  echo "== facts $shape: $l s left"
  # shellcheck disable=SC2086
  timeout --signal=TERM --kill-after=15 $((l - 5)) python3 bench/gpu/vllm_facts.py --engine "$ENGINE" \
    --vllm-site "$SITE" --pkgs "$PKGS" --shape "$shape" --out "$dir" --work /tmp/qtrap-vllm \
    --precisions "${PRECISIONS:-bf16,fp8}" --kv-tokens "${KV_TOKENS:-120000}" ${RUN_ARGS:-}
  echo "== facts: exit $?"
  pack
  exit 0
fi

if [ "${JOB:-sweep}" = routing ]; then  # routing by cost against each pinned precision, one schedule
  shape=${SHAPES:-qwen3-8b}
  dir="$RES/routing-$shape${TAG:+-$TAG}"
  mkdir -p "$dir"
  l=$(left)
  echo "== routing $shape: $l s left"
  # shellcheck disable=SC2086
  timeout --signal=TERM --kill-after=15 $((l - 5)) python3 bench/gpu/vllm_routing.py --engine "$ENGINE" \
    --vllm-site "$SITE" --shape "$shape" --out "$dir" --work /tmp/qtrap-vllm \
    --precisions "${PRECISIONS:-bf16,fp8,w4a16}" --kv-tokens "${KV_TOKENS:-60000}" \
    --deadline-s $((l - 40)) ${RUN_ARGS:-}
  echo "== routing: exit $?"
  pack
  exit 0
fi

for shape in $SHAPE_LIST; do
  now=$(date +%s)
  l=$(left)
  if [ "$l" -lt 240 ]; then
    echo "== skipping $shape: only $l s left"
    continue
  fi
  dir="$RES/$shape${TAG:+-$TAG}"
  mkdir -p "$dir"
  echo "== $shape: $l s left"
  export QTRAP_DEADLINE_UNIX=$((now + l - 15))
  # shellcheck disable=SC2086
  timeout --signal=TERM --kill-after=15 $((l - 5)) python3 bench/gpu/vllm_e2e.py run --engine "$ENGINE" \
    --vllm-site "$SITE" --shape "$shape" --out "$dir" --work /tmp/qtrap-vllm \
    --precisions "${PRECISIONS:-bf16,fp8,w8a8,w4a16}" --concurrency "${CONCURRENCY:-1,4,16,64,128,256}" \
    --duration "${DURATION_S:-8}" --max-tokens "${MAX_TOKENS:-64}" --kv-tokens "${KV_TOKENS:-120000}" \
    ${RUN_ARGS:-}
  echo "== $shape: exit $?, $(($(date +%s) - now)) s"
  pack
done
echo "done in $(($(date +%s) - START)) s"
