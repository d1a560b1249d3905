#!/usr/bin/env bash
# One command for the tests: sets up ./.venv (first time only) and runs the whole suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
"$RELU_REGIONS_PY" -m ruff check relu_regions tests benchmarks
exec "$RELU_REGIONS_PY" -m pytest -n 2 -q "$@"
