#!/usr/bin/env bash
# Set up qtrap on a fresh Debian machine: a virtual environment in .venv with the
# project and its `loadgen` extra installed. With --test, also the test tools: Debian's
# prometheus (promtool), chromium (the HTML report is checked in a headless browser) and docker-compose
# (`docker-compose config` checks deploy/compose when the `docker compose` plugin is absent), postgresql
# (the fleet ledger's tests start their own PostgreSQL server from its binaries; the package's own
# cluster service is not used),
# the CPU build of PyTorch and HF transformers (for a real `transformers serve`
# backend), the openai SDK and TGI's text-generation client.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: Python >= 3.11 is required ($PY is $("$PY" --version 2>&1))" >&2
  exit 1
fi

have_compose() { docker compose version || command -v docker-compose; }
have_postgres() { compgen -G "/usr/lib/postgresql/*/bin/initdb" || command -v initdb; }
if [[ $want_test == 1 ]] && ! { command -v promtool && command -v chromium && have_compose && have_postgres; } >/dev/null 2>&1; then
  echo "setup: installing Debian packages: prometheus chromium docker-compose postgresql"
  SUDO=""; [[ $(id -u) != 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus chromium docker-compose postgresql >/dev/null
fi

if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
PIP=(pip_quiet .venv/bin/python -m pip install -q --disable-pip-version-check)
pip_quiet() {  # pip's warnings about unreachable extra index folders are noise here
  "$@" 2> >(grep -v "^WARNING: Location '" >&2)
}

# Skip the installs when nothing changed since the last successful run (a test set-up
# also covers the plain one).
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
stamp=.venv/.qtrap-setup-$want_test
if [[ "$(cat .venv/.qtrap-setup-1 2>/dev/null)" == "$want" || "$(cat "$stamp" 2>/dev/null)" == "$want" ]]; then
  exit 0
fi

if [[ $want_test == 1 ]]; then
  # The CPU wheel first, so that nothing below pulls the CUDA build of torch.
  echo "setup: installing torch 2.13.0 (CPU)"
  "${PIP[@]}" "torch==2.13.0"
  echo "setup: installing qtrap with the loadgen and test extras"
  "${PIP[@]}" -e ".[loadgen,test]"
  # text-generation pins huggingface-hub<1.0, which transformers 5 cannot use; the client
  # itself only needs requests, aiohttp and pydantic, so it goes in without its pins.
  "${PIP[@]}" --no-deps "text-generation==0.7.0"
else
  echo "setup: installing qtrap with the loadgen extra"
  "${PIP[@]}" -e ".[loadgen]"
fi
echo "$want" > "$stamp"
