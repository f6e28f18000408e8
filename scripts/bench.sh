#!/usr/bin/env bash
# Sets up everything on a fresh machine, then runs the benchmark (quick by default; pass
# your own options, e.g. `bash scripts/bench.sh --device cuda`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
if [ "$#" -eq 0 ]; then set -- --quick; fi
exec "$PY" -m fusedopt.bench "$@"
