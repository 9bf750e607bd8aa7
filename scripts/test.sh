#!/usr/bin/env bash
# Set everything up (first run) and run the whole test suite: unit, integration, lint and types.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [[ $rc == 5 ]]; then
  echo "test: pytest collected no tests" >&2
  exit 1
fi
exit $rc
