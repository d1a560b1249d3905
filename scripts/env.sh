#!/usr/bin/env bash
# Creates (or reuses) ./.venv with everything relu-regions needs, CPU-only.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run repeatedly.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${RELU_REGIONS_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[env] creating $venv" >&2
  "$py" -m venv "$venv"
fi
stamp="$venv/.relu-regions-installed"
want="$(cat "$root/constraints.txt" "$root/setup.cfg" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[env] installing dependencies (torch pinned by constraints.txt)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  # torch first, alone, so nothing later can choose a different build
  "$venv/bin/python" -m pip install -q -c "$root/constraints.txt" "torch==2.13.0" >&2
  "$venv/bin/python" -m pip install -q -c "$root/constraints.txt" -e "$root[all,dev]" >&2
  echo "$want" > "$stamp"
fi
if "$venv/bin/python" -m pip list 2>/dev/null | grep -qi '^nvidia'; then
  echo "[env] ERROR: nvidia-* packages were installed into $venv: a CUDA torch was pulled in." >&2
  echo "[env] Remove $venv and check constraints.txt." >&2
  "$venv/bin/python" -m pip list 2>/dev/null | grep -i nvidia >&2
  exit 3
fi
if "$venv/bin/python" -c "import torchvision" 2>/dev/null; then :; elif "$venv/bin/python" -m pip show torchvision >/dev/null 2>&1; then
  echo "[env] ERROR: a broken torchvision is installed in $venv (it breaks lightning); uninstall it." >&2
  exit 3
fi
export RELU_REGIONS_PY="$venv/bin/python"
