#!/usr/bin/env bash
# One command for the main job: sets up ./.venv (first time only) and runs the demo.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
exec "$RELU_REGIONS_PY" -m relu_regions.cli demo "$@"
