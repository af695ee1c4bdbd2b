#!/usr/bin/env bash
# Create the peers' own virtualenv (pyDVL, captum, kronfluence, dattri beside a CPU torch 2.13)
# and install inflens into it too, so that every method runs in the same interpreter.
# Usage: bash benchmarks/peers/install.sh [VENV_DIR]   (default: benchmarks/peers/.venv)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${1:-$here/.venv}"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet -r "$here/requirements.txt"
"$venv/bin/pip" install --quiet --no-deps -e "$root"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "pydvl", "captum", "kronfluence", "dattri", "inflens"):
    print(f"{name}=={md.version(name)}")
PY
