#!/usr/bin/env bash
# One command: install the peers into their own virtualenv (once), then run the side-by-side
# benchmark. Usage: bash benchmarks/peers/run.sh [OUT_DIR] [extra run.py args...]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$here/.venv"
out="${1:-$root/runs/bench_peers}"
shift || true
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import pydvl, captum, kronfluence, dattri, inflens" 2>/dev/null; then
  bash "$here/install.sh" "$venv"
fi
cd "$root"
"$venv/bin/python" "$here/run.py" --out "$out" "$@"
